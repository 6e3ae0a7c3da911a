"""Deciding, as plain data: op rules, where int8 flows, calibration, the plan and its constants,
the layout probe and the accuracy budget. Nothing here rewrites a graph."""

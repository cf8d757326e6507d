"""Independent plain-PyTorch references the project's code is checked against (no megatron imports)."""

"""Our safetensors format, converters from HF / timm / Google npz, and hub resolution."""

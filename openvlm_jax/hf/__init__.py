"""Hugging Face interop: the only package that knows HF tensor names and config.json.

`config`: HF config <-> our configs; `convert`: HF tensors <-> our params;
`io`: checkpoint folders (load_pretrained, load_llm_and_vision, save_pretrained,
save_processor).
"""

"""Our backbones as folders other software loads without diffuse: a stock Llama (llama.py) and a self-contained
remote-code bidirectional transformer in the LLaDA/Dream convention (remote.py, writing modeling_diffuse.py)."""

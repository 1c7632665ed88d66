"""Image token layouts, engine-free: which token each generated position may hold.

grid.py holds `ImageGrid` (one image's layout); chameleon.py, emu3.py and
llamagen.py each family's sizes, prompts and sampling defaults;
constraints.py applies grids per request inside the engine; and
logits_processor.py is the same as a public vLLM logits processor.
"""

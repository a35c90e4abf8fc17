"""The built-in blocks, one module per family; `zoo/builtins.py` registers them (with every other
built-in kind) through the same `zoo_register` hook as any plugin."""

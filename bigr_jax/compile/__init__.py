"""`--mode=compile`'s engine: compiling a family's programs for a TPU topology from any host (`report`), and
reading the compiled HLO (`hlo`). Families hand it their programs; nothing here imports a trainer or a model."""

"""Language-model building blocks shared by the LLM families: backbone loading (any HF causal LM; SmolLM2 offline)."""

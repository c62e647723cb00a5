"""Language-model recommenders: backbone loading, prompts, constrained decoding, item-token LM."""

"""Pure library: InternVL2 checkpoints, preprocessing, vision, decoders and the LLM engine."""

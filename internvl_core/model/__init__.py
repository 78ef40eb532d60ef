"""Decoder stacks (Qwen2, InternLM2, Phi-3, Llama/Yi), attention over block tables, weights."""

"""Generation engines: base (the Protocol and shared load logic), vllm, hf, factory."""

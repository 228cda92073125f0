"""Code that runs inside vLLM's worker processes, mixed into the worker class by
`LLM(worker_extension_cls="eval_daemon.engines.vllm_worker.CheckpointReload")`.

vLLM's `reload_weights(weights_path=...)` loads a new checkpoint into the live model in place.
One gap (seen on vLLM 0.32, CPU backend): with tied word embeddings (Qwen2.5-Math-1.5B, the tiny
test model) the checkpoint has no `lm_head.weight`, so the layerwise reload skips the LM head and
never re-runs its post-load processing. On CPU that processing packs the weight into a oneDNN
handle, so the head kept computing logits with the OLD embeddings: wrong outputs, no error. After
the reload we re-run the head's processing when it is tied and unquantized (a no-op on GPU, where
the head reads the shared weight directly). tests/test_eval_vllm.py checks the outputs against a
freshly started engine.
"""

from __future__ import annotations


class CheckpointReload:
    """Worker methods callable as `llm.collective_rpc("reload_checkpoint", args=(path,))`."""

    def reload_checkpoint(self, weights_path: str) -> dict:
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return {"tied_head_refreshed": refresh_tied_lm_head(self.model_runner.get_model())}


def refresh_tied_lm_head(model) -> bool:
    """Re-run the unquantized LM head's post-load processing when it shares the embedding weight."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "quant_method"):
        return False
    tied = head.weight.data_ptr() == embed.weight.data_ptr()
    if not tied or type(head.quant_method).__name__ != "UnquantizedEmbeddingMethod":
        return False
    head.quant_method.process_weights_after_loading(head)
    return True

"""The serving engine: iteration-level scheduling (continuous batching with stall-free chunked
prefill) over a paged, prefix-shared KV cache whose block ids every device uses for its own heads.

`sequence` holds a request's state, `block_manager` the KV block ids, `scheduler` decides each
step's batch. All three are plain Python over sequences and block ids, with no model and no
network; the tensors live on the devices (galaxy/model/paged_kv.py).

The OpenAI-compatible endpoint is here too: `openai` (request parsing) and `server` (HTTP).
"""

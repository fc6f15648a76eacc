"""The serving engine: iteration-level scheduling (continuous batching with stall-free chunked
prefill) over a paged, prefix-shared KV cache whose block ids every device uses for its own heads.

- `sequence`: a request's state; `block_manager`: the KV block ids, reference counts, the prefix
  cache; `scheduler`: each step's batch. Plain Python over sequences and block ids, no model and
  no network (the tensors live on the devices, galaxy/model/paged_kv.py).
- `engine`: the loop that runs the scheduler's steps on an Executor and streams tokens to requests;
  `generation`: what a request asks for and gets back; `sampling`: choosing each next token.
"""

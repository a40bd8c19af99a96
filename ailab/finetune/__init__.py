"""Fine-tuning: conversations in, a model in models/custom/ out, ready to switch to.

`spec` (the request, status and sidecar models), `data` (records and template rendering),
`special_tokens` (the training copy's vocabulary, through `ailab.gguf_meta`), `progress`
(the progress bar), `job` (one run), `service` (the gateway's side), `cli` (`ailab-finetune`).
"""

"""The pipeline stages, one module each: gate -> finetune -> slim (+ export), and run, which chains them.

Each stage has an in-memory function (`gate`, `finetune`, `slim`) that takes and returns typed results
and never needs a file, and a file-based shell (`gate_stage`, `finetune_stage`, `slim_stage`) that loads
and saves checkpoints around it; the CLI calls the shells. `report` measures anything a user points at.
"""

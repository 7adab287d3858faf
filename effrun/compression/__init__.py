"""Compression methods: one file per method, one YAML per method under configs/compression/.

A method is a config dataclass (its fields are the YAML's schema) that is called by its stage:

    @dataclass
    class MyMethod:
        amount: float = 0.5
        def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult: ...

It receives the parent stage's model and the read-only `StageInputs` (data, hardware, the run's
training settings, `inputs.fit(...)` and `inputs.evaluate(...)`) and returns one `StageResult`
(the new model, its accuracy, its figures, how to save it). The contract, field by field, is in
effrun/stage.py. Adding a method touches two files: effrun/compression/<stage>/<name>.py and
configs/compression/<stage>/<name>.yaml (which extends the dataclass's schema, registered in
effrun/schema.py's SCHEMAS); select it with `compression/<stage>=<name>`.
"""

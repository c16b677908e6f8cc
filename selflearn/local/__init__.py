"""`selflearn local`: the whole learning loop on one machine.

    serve (base model, or the promoted checkpoint when resuming)
    loop:  train round N in a niced subprocess  ->  metrics from the round's manifest
           ->  selflearn.policy.decide  ->  promote: store.set_promoted + hot-swap serving
           ->  record the round in <data-dir>/local-state.json (also the dashboard's /api/rounds)

Modules, from pure to I/O:

- `records`: what one finished round leaves (`RoundRecord`) and what is read of its manifest;
- `state`: `LocalState` (frozen) and the decisions (`apply_result`, `next_round`, ...), pure
  functions that return a new state, tested without Ray or a model;
- `events`: what the driver tells its listener (`RoundStarted`, `RoundProgressed`, `RoundRecorded`);
- `state_file`: the state on disk as JSON (write-then-rename), read by the dashboard and `selflearn status`;
- `recovery`: what start-up makes of the store after a crash (unrecorded checkpoints, half uploads);
- `trainer_process`: one `selflearn train` round in a niced subprocess, and its result;
- `driver`: `LocalDriver`, the loop: train, decide, promote, swap, record;
- `serving`: the Ray Serve glue (start, stop, the deployment's user_config, the swap);
- `cli`, `status`: the `selflearn local` and `selflearn status` commands; `terminal`: the running
  round in `selflearn local`'s terminal; `web/`: the browser dashboard.

This package imports nothing heavy at import time: `selflearn --help` loads `cli` and `status`.
"""

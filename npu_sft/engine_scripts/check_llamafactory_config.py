"""Parse a LLaMA-Factory train config with LLaMA-Factory's own argument parser. Runs inside the ENGINE env.

    <engine-python> check_llamafactory_config.py CONFIG.yaml

Prints one JSON line: {"ok": true} or {"ok": false, "error": "..."}; exit code 0 either way, 2 on a usage error.
`get_train_args` would also refuse DeepSpeed outside torchrun, so only the parser step runs: it rejects unknown
keys and wrong types and runs the dataclasses' own consistency checks, without loading a model or taking a device.
"""

import json
import sys

import yaml


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check_llamafactory_config.py CONFIG.yaml", file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as handle:
        config = yaml.safe_load(handle)

    # A private name in llamafactory 0.9.x; this is the one place that depends on it.
    from llamafactory.hparams.parser import _parse_train_args

    try:
        _parse_train_args(config)
    except (ValueError, TypeError) as err:
        print(json.dumps({"ok": False, "error": str(err)}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

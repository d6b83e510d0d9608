"""Can torch in the ENGINE env reach the cards? The seeds' own check: import torch (and torch_npu), ask whether the
device is available, and multiply a small matrix on each visible card.

    <engine-python> - KIND < probe_devices.py        # KIND: npu, gpu or cpu; the visible-devices variable is set

Prints one JSON line: {"torch": "2.14.0", "torch_npu": "2.14.0", "available": true, "count": 2,
"cards": [{"index": 0, "name": "Ascend910B3", "ok": true}, {"index": 1, "name": "Ascend910B3", "ok": false,
"error": "..."}]} or {"error": "import torch_npu: ..."};
exit code 0 either way, 2 on a usage error.
"""

import json
import sys


def first_lines(error: BaseException, count: int = 3) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: " + " / ".join(lines[:count])


def probe(kind: str) -> dict:
    found: dict = {"kind": kind}
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - reported, whatever it is
        return {**found, "error": f"import torch: {first_lines(error)}"}
    found["torch"] = torch.__version__
    if kind == "cpu":
        x = torch.randn(2, 2)
        x.mm(x)
        return {**found, "available": True, "count": 1, "cards": [{"index": 0, "ok": True}]}
    if kind == "npu":
        try:
            import torch_npu
        except Exception as error:  # noqa: BLE001 - an ImportError, or CANN's libraries failing to load
            return {**found, "error": f"import torch_npu: {first_lines(error)}"}
        found["torch_npu"] = getattr(torch_npu, "__version__", "unknown")
        backend = torch.npu
    else:
        backend = torch.cuda
    found["available"] = bool(backend.is_available())
    found["count"] = int(backend.device_count()) if found["available"] else 0
    cards = []
    for index in range(found["count"]):
        card: dict = {"index": index}
        try:
            card["name"] = str(backend.get_device_name(index))  # torch_npu: "Ascend910B3", "Ascend310P3"
        except Exception:  # noqa: BLE001 - the name is extra; the matmul below says whether the card works
            pass
        try:
            backend.set_device(index)
            x = torch.randn(2, 2).npu() if kind == "npu" else torch.randn(2, 2).cuda()
            result = x.mm(x)
            backend.synchronize()
            result.cpu()
            cards.append({**card, "ok": True})
        except Exception as error:  # noqa: BLE001 - a kernel or driver error on this card
            cards.append({**card, "ok": False, "error": first_lines(error)})
    return {**found, "cards": cards}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ("npu", "gpu", "cpu"):
        print("usage: probe_devices.py npu|gpu|cpu", file=sys.stderr)
        return 2
    print(json.dumps(probe(sys.argv[1])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

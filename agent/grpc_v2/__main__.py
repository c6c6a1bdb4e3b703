"""``python -m agent.grpc_v2``: the gRPC gateway process (started by the daemon)."""

import sys

try:
    from agent.grpc_v2.gateway import main
except ModuleNotFoundError as exc:  # the extra is not installed: one clear line
    print(
        f"edgeward-grpc: {exc}; install the grpc extra (pip install 'edgeward[grpc]')",
        file=sys.stderr,
    )
    sys.exit(2)

sys.exit(main())

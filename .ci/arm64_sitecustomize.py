"""Installed as sitecustomize.py in the emulated arm64 root only (see .ci/arm64.sh).

LiteRT interpreters there default to the builtin kernels instead of XNNPACK, whose NEON
kernels run 10-15x slower than them under qemu-user 7.2 (measured in the root:
hand_landmark_lite 25 s vs 1.8 s per invoke). A caller that names an op resolver keeps it.
"""

try:
    from ai_edge_litert import interpreter as _litert
except Exception:  # no LiteRT, nothing to adjust
    _litert = None

if _litert is not None:
    _Base = _litert.Interpreter

    class _EmulatedInterpreter(_Base):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs.setdefault(
                "experimental_op_resolver_type",
                _litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            super().__init__(*args, **kwargs)

    _litert.Interpreter = _EmulatedInterpreter

"""KServe v2 / Triton gRPC (the optional ``edgeward[grpc]`` extra): stubs generated
from Triton's ``grpc_service.proto`` and ``model_config.proto`` (BSD-3-Clause, NVIDIA;
the protos and their licence are in ``proto/``), and the gateway process
(``agent.grpc_v2.gateway``). Nothing here is imported unless gRPC is enabled."""

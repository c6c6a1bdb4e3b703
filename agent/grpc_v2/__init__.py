"""KServe v2 / Triton gRPC (the optional ``edgeward[grpc]`` extra): stubs generated
from Triton's ``grpc_service.proto`` and ``model_config.proto`` (BSD-3-Clause, NVIDIA;
the protos and their licence are in ``proto/``), and the gateway process
(``agent.grpc_v2.gateway``, served by our HTTP/2 core ``agent/serving/h2.py``; it needs
protobuf and hpack, not grpcio: ``grpc_service_pb2_grpc`` is kept for clients and
tests). Nothing here is imported unless gRPC is enabled."""

"""Gateway: the public API (OpenAI-style REST, gRPC) in front of the router; never touches a model."""

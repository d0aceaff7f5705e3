"""A tiny gRPC service for the minimesh demo and Docker tests, with no generated code:
`greeter.Greeter` with a unary `Greet` and a bidirectional-streaming `Chat`, messages as JSON.
"""

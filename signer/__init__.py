"""The service edge of Signet: gRPC servicers, authentication, client library and CLI."""

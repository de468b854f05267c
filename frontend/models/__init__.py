"""Built-in model zoo, defined in torch (torchvision does not import beside torch 2.13)."""

"""RQ workers: everything that runs or trains a model. Not built yet."""

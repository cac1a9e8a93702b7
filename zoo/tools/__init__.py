"""Tools over the registry: model info (params, GMACs), model cards, benchmarks, export."""

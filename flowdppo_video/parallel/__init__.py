"""Parallelism applied to a model and a trainer from outside: process groups (``groups``),
Ulysses sequence parallelism (``sequence``) and DeepSpeed ZeRO for the update (``zero``)."""

"""KD methods: each is a KDMethod (kdfast.methods.base) that a trainer calls once per epoch and per
batch."""

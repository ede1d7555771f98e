"""kdfast's core: what every other part builds on, importing nothing of kdfast above it.

backend   which backends are usable here and the choice for one call (the only reader of
          KDFAST_BACKEND)
checks    argument and option checks with messages that name the argument
csr       every helper on compressed sparse rows (the format of exclusion and interaction lists)
numerics  accumulation dtype, reductions, row gathers with reproducible gradients, safe
          normalisation, the rank keys of the top-K order
autodiff  the machinery each op registers through (torch.library custom op, fake implementation,
          autograd, eager twin) and the gradients of the references
files     files written whole or not at all
"""

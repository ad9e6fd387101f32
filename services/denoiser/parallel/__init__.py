"""Parallelism inside one denoiser replica (a group of ranks running one request together).

mesh      the (cfg, ring, ulysses, tp) process groups of a replica
comm      the collectives everything else uses (uneven all-to-all, ring exchange)
ulysses   all-to-all sequence parallelism around attention
ring      ring attention: K/V blocks passed around, online-softmax merge
context   the sequence-parallel state the attention dispatch consults during a forward
tp        tensor-parallel linears (over the shared ones in services/runtime/tensor_parallel.py)

Model files never call torch.distributed; only this package and the shared parallel layers and
rank group in services/runtime do."""

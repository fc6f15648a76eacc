"""Splitting one forward pass over devices: pure compute plus point-to-point sends.

- `sharding`: `Strategy`, `Partition` (a cluster's layout) and `ShardSpec` (one device's part), the style
  table that cuts a shard's weights;
- `collectives`: every collective, as ring or direct algorithms over a `Transport`, tile-fused with GEMMs;
- `forward`: one rank's pass under each strategy (`galaxy_layer` is the HMP layer);
- `rank`: a device's loaded shard and KV caches (`RankRuntime`), whatever carries its tensors;
- `executor`: the interface every way of running ranks offers (`Executor`, `LoadOptions`, `ForwardResult`);
- `local_transport`: ranks as threads of one process; `codec`: lossy activation formats for slow links.
No grpc, psutil or argparse here: the same code runs over in-process queues and over the network.
"""

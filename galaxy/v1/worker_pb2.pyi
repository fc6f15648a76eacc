from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
INT8: DType
UINT8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    def __init__(self, cluster: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "device_name", "galaxy_version", "cpu_count", "threads", "compute_device", "total_memory_bytes", "available_memory_bytes", "memory_budget_bytes", "state", "session_id", "rss_bytes", "data_port", "cpu_limit", "host_id", "host_cpus", "droppable_bytes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    GALAXY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_CPUS_FIELD_NUMBER: _ClassVar[int]
    DROPPABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    device_name: str
    galaxy_version: str
    cpu_count: int
    threads: int
    compute_device: str
    total_memory_bytes: int
    available_memory_bytes: int
    memory_budget_bytes: int
    state: str
    session_id: str
    rss_bytes: int
    data_port: int
    cpu_limit: float
    host_id: str
    host_cpus: int
    droppable_bytes: int
    def __init__(self, protocol_version: _Optional[int] = ..., device_name: _Optional[str] = ..., galaxy_version: _Optional[str] = ..., cpu_count: _Optional[int] = ..., threads: _Optional[int] = ..., compute_device: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., available_memory_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., state: _Optional[str] = ..., session_id: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., data_port: _Optional[int] = ..., cpu_limit: _Optional[float] = ..., host_id: _Optional[str] = ..., host_cpus: _Optional[int] = ..., droppable_bytes: _Optional[int] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("path", "random_init", "seed", "config_json", "random_std", "shard_hash")
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANDOM_INIT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    RANDOM_STD_FIELD_NUMBER: _ClassVar[int]
    SHARD_HASH_FIELD_NUMBER: _ClassVar[int]
    path: str
    random_init: bool
    seed: int
    config_json: str
    random_std: float
    shard_hash: str
    def __init__(self, path: _Optional[str] = ..., random_init: _Optional[bool] = ..., seed: _Optional[int] = ..., config_json: _Optional[str] = ..., random_std: _Optional[float] = ..., shard_hash: _Optional[str] = ...) -> None: ...

class ShardPart(_message.Message):
    __slots__ = ("model_hash", "spec_json", "config_json", "n_tensors", "name", "tensor", "alias_of", "content_hash", "chunk", "shard_bytes", "weights_format")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    N_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ALIAS_OF_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHARD_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FORMAT_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    spec_json: str
    config_json: str
    n_tensors: int
    name: str
    tensor: Tensor
    alias_of: str
    content_hash: str
    chunk: bytes
    shard_bytes: int
    weights_format: str
    def __init__(self, model_hash: _Optional[str] = ..., spec_json: _Optional[str] = ..., config_json: _Optional[str] = ..., n_tensors: _Optional[int] = ..., name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., alias_of: _Optional[str] = ..., content_hash: _Optional[str] = ..., chunk: _Optional[bytes] = ..., shard_bytes: _Optional[int] = ..., weights_format: _Optional[str] = ...) -> None: ...

class ShardReceipt(_message.Message):
    __slots__ = ("content_hash", "bytes", "cached")
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    content_hash: str
    bytes: int
    cached: bool
    def __init__(self, content_hash: _Optional[str] = ..., bytes: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class HaveShardRequest(_message.Message):
    __slots__ = ("model_hash", "spec_json")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    spec_json: str
    def __init__(self, model_hash: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class HaveShardReply(_message.Message):
    __slots__ = ("content_hash",)
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    content_hash: str
    def __init__(self, content_hash: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("session_id", "model", "partition_json", "rank", "peers", "dtype", "tiles", "recv_timeout_s", "wire_formats", "no_overlap", "backend", "data_peers", "seq_len", "weights_format", "decode_threads", "kv_ticket_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTITION_JSON_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    RECV_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    NO_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DATA_PEERS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DECODE_THREADS_FIELD_NUMBER: _ClassVar[int]
    KV_TICKET_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: ModelRef
    partition_json: str
    rank: int
    peers: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    tiles: int
    recv_timeout_s: float
    wire_formats: _containers.RepeatedScalarFieldContainer[str]
    no_overlap: bool
    backend: str
    data_peers: _containers.RepeatedScalarFieldContainer[str]
    seq_len: int
    weights_format: str
    decode_threads: int
    kv_ticket_key: bytes
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., partition_json: _Optional[str] = ..., rank: _Optional[int] = ..., peers: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., tiles: _Optional[int] = ..., recv_timeout_s: _Optional[float] = ..., wire_formats: _Optional[_Iterable[str]] = ..., no_overlap: _Optional[bool] = ..., backend: _Optional[str] = ..., data_peers: _Optional[_Iterable[str]] = ..., seq_len: _Optional[int] = ..., weights_format: _Optional[str] = ..., decode_threads: _Optional[int] = ..., kv_ticket_key: _Optional[bytes] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("weight_bytes", "load_s", "rss_bytes", "backend", "kv_bytes_per_token", "kv_budget_bytes", "memory_budget_bytes", "decode_threads")
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_THREADS_FIELD_NUMBER: _ClassVar[int]
    weight_bytes: int
    load_s: float
    rss_bytes: int
    backend: str
    kv_bytes_per_token: int
    kv_budget_bytes: int
    memory_budget_bytes: int
    decode_threads: int
    def __init__(self, weight_bytes: _Optional[int] = ..., load_s: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., decode_threads: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "input_ids", "token_types", "start_pos", "last_only", "no_overlap", "measure_memory", "wire_formats")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPES_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    LAST_ONLY_FIELD_NUMBER: _ClassVar[int]
    NO_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    MEASURE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    input_ids: Tensor
    token_types: Tensor
    start_pos: int
    last_only: bool
    no_overlap: bool
    measure_memory: bool
    wire_formats: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., token_types: _Optional[_Union[Tensor, _Mapping]] = ..., start_pos: _Optional[int] = ..., last_only: _Optional[bool] = ..., no_overlap: _Optional[bool] = ..., measure_memory: _Optional[bool] = ..., wire_formats: _Optional[_Iterable[str]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "input_ids", "query_lens", "starts", "block_table_lens", "block_tables", "logit_rows", "copies", "num_blocks", "block_size", "top1_rows", "kernel_from")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    QUERY_LENS_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_LENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLES_FIELD_NUMBER: _ClassVar[int]
    LOGIT_ROWS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP1_ROWS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FROM_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    input_ids: Tensor
    query_lens: _containers.RepeatedScalarFieldContainer[int]
    starts: _containers.RepeatedScalarFieldContainer[int]
    block_table_lens: _containers.RepeatedScalarFieldContainer[int]
    block_tables: _containers.RepeatedScalarFieldContainer[int]
    logit_rows: _containers.RepeatedScalarFieldContainer[int]
    copies: _containers.RepeatedScalarFieldContainer[int]
    num_blocks: int
    block_size: int
    top1_rows: _containers.RepeatedScalarFieldContainer[int]
    kernel_from: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., query_lens: _Optional[_Iterable[int]] = ..., starts: _Optional[_Iterable[int]] = ..., block_table_lens: _Optional[_Iterable[int]] = ..., block_tables: _Optional[_Iterable[int]] = ..., logit_rows: _Optional[_Iterable[int]] = ..., copies: _Optional[_Iterable[int]] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., top1_rows: _Optional[_Iterable[int]] = ..., kernel_from: _Optional[_Iterable[int]] = ...) -> None: ...

class KVBox(_message.Message):
    __slots__ = ("session_id", "block_table", "num_tokens", "layer_lo", "layer_hi", "head_lo", "head_hi", "num_blocks", "block_size", "kv", "start", "while_stepping", "ticket", "revoke_nonces")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_LO_FIELD_NUMBER: _ClassVar[int]
    LAYER_HI_FIELD_NUMBER: _ClassVar[int]
    HEAD_LO_FIELD_NUMBER: _ClassVar[int]
    HEAD_HI_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    WHILE_STEPPING_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    REVOKE_NONCES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    block_table: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    layer_lo: int
    layer_hi: int
    head_lo: int
    head_hi: int
    num_blocks: int
    block_size: int
    kv: Tensor
    start: int
    while_stepping: bool
    ticket: KVTicket
    revoke_nonces: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[str] = ..., block_table: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., layer_lo: _Optional[int] = ..., layer_hi: _Optional[int] = ..., head_lo: _Optional[int] = ..., head_hi: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., kv: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[int] = ..., while_stepping: _Optional[bool] = ..., ticket: _Optional[_Union[KVTicket, _Mapping]] = ..., revoke_nonces: _Optional[_Iterable[bytes]] = ...) -> None: ...

class KVReply(_message.Message):
    __slots__ = ("kv", "seconds", "bytes", "send_s", "receipt")
    KV_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    kv: Tensor
    seconds: float
    bytes: int
    send_s: float
    receipt: bytes
    def __init__(self, kv: _Optional[_Union[Tensor, _Mapping]] = ..., seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., send_s: _Optional[float] = ..., receipt: _Optional[bytes] = ...) -> None: ...

class KVTicket(_message.Message):
    __slots__ = ("src_session", "src_rank", "dst_session", "dst_rank", "block_table", "num_blocks", "block_size", "start", "num_tokens", "layer_lo", "layer_hi", "head_lo", "head_hi", "dtype", "nbytes", "nonce", "mac")
    SRC_SESSION_FIELD_NUMBER: _ClassVar[int]
    SRC_RANK_FIELD_NUMBER: _ClassVar[int]
    DST_SESSION_FIELD_NUMBER: _ClassVar[int]
    DST_RANK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_LO_FIELD_NUMBER: _ClassVar[int]
    LAYER_HI_FIELD_NUMBER: _ClassVar[int]
    HEAD_LO_FIELD_NUMBER: _ClassVar[int]
    HEAD_HI_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    src_session: str
    src_rank: int
    dst_session: str
    dst_rank: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    num_blocks: int
    block_size: int
    start: int
    num_tokens: int
    layer_lo: int
    layer_hi: int
    head_lo: int
    head_hi: int
    dtype: DType
    nbytes: int
    nonce: bytes
    mac: bytes
    def __init__(self, src_session: _Optional[str] = ..., src_rank: _Optional[int] = ..., dst_session: _Optional[str] = ..., dst_rank: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., layer_lo: _Optional[int] = ..., layer_hi: _Optional[int] = ..., head_lo: _Optional[int] = ..., head_hi: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., nbytes: _Optional[int] = ..., nonce: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class KVSend(_message.Message):
    __slots__ = ("box", "dst_address", "ticket")
    BOX_FIELD_NUMBER: _ClassVar[int]
    DST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    box: KVBox
    dst_address: str
    ticket: KVTicket
    def __init__(self, box: _Optional[_Union[KVBox, _Mapping]] = ..., dst_address: _Optional[str] = ..., ticket: _Optional[_Union[KVTicket, _Mapping]] = ...) -> None: ...

class KVStashRequest(_message.Message):
    __slots__ = ("session_id", "num_blocks", "block_size", "open_bytes", "close", "drop", "put_names", "put_blocks", "restore_names", "restore_blocks")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    PUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    PUT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_NAMES_FIELD_NUMBER: _ClassVar[int]
    RESTORE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    num_blocks: int
    block_size: int
    open_bytes: int
    close: bool
    drop: _containers.RepeatedScalarFieldContainer[bytes]
    put_names: _containers.RepeatedScalarFieldContainer[bytes]
    put_blocks: _containers.RepeatedScalarFieldContainer[int]
    restore_names: _containers.RepeatedScalarFieldContainer[bytes]
    restore_blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., open_bytes: _Optional[int] = ..., close: _Optional[bool] = ..., drop: _Optional[_Iterable[bytes]] = ..., put_names: _Optional[_Iterable[bytes]] = ..., put_blocks: _Optional[_Iterable[int]] = ..., restore_names: _Optional[_Iterable[bytes]] = ..., restore_blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class KVStashReply(_message.Message):
    __slots__ = ("stored", "missing", "held_bytes", "max_bytes", "seconds")
    STORED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    missing: _containers.RepeatedScalarFieldContainer[bytes]
    held_bytes: int
    max_bytes: int
    seconds: float
    def __init__(self, stored: _Optional[_Iterable[bytes]] = ..., missing: _Optional[_Iterable[bytes]] = ..., held_bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class OpStat(_message.Message):
    __slots__ = ("tag", "wall_s", "wait_s", "compute_s", "bytes", "send_s")
    TAG_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    tag: str
    wall_s: float
    wait_s: float
    compute_s: float
    bytes: int
    send_s: float
    def __init__(self, tag: _Optional[str] = ..., wall_s: _Optional[float] = ..., wait_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., bytes: _Optional[int] = ..., send_s: _Optional[float] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("output", "forward_s", "ops", "peak_rss_bytes", "kv_cache_bytes", "rss_before_bytes", "cpu_s", "top1_values", "top1_ids", "decode_threads")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BEFORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    TOP1_VALUES_FIELD_NUMBER: _ClassVar[int]
    TOP1_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_THREADS_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    forward_s: float
    ops: _containers.RepeatedCompositeFieldContainer[OpStat]
    peak_rss_bytes: int
    kv_cache_bytes: int
    rss_before_bytes: int
    cpu_s: float
    top1_values: _containers.RepeatedScalarFieldContainer[float]
    top1_ids: _containers.RepeatedScalarFieldContainer[int]
    decode_threads: int
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., forward_s: _Optional[float] = ..., ops: _Optional[_Iterable[_Union[OpStat, _Mapping]]] = ..., peak_rss_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., rss_before_bytes: _Optional[int] = ..., cpu_s: _Optional[float] = ..., top1_values: _Optional[_Iterable[float]] = ..., top1_ids: _Optional[_Iterable[int]] = ..., decode_threads: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Frame(_message.Message):
    __slots__ = ("session_id", "request_id", "src_rank", "seq", "tensor", "decoded_dtype", "scales")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_RANK_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DECODED_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    src_rank: int
    seq: int
    tensor: Tensor
    decoded_dtype: DType
    scales: Tensor
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., src_rank: _Optional[int] = ..., seq: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., decoded_dtype: _Optional[_Union[DType, str]] = ..., scales: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExchangeSummary(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: int
    def __init__(self, frames: _Optional[int] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("config_json", "seq_lens", "dtype", "repeats")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    seq_lens: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    repeats: int
    def __init__(self, config_json: _Optional[str] = ..., seq_lens: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., repeats: _Optional[int] = ...) -> None: ...

class BlockSample(_message.Message):
    __slots__ = ("kind", "units", "seq", "seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    units: int
    seq: int
    seconds: float
    def __init__(self, kind: _Optional[str] = ..., units: _Optional[int] = ..., seq: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ProfileReply(_message.Message):
    __slots__ = ("samples", "available_memory_bytes", "memory_budget_bytes", "threads", "elapsed_s", "codec_s_per_byte")
    class CodecSPerByteEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    CODEC_S_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[BlockSample]
    available_memory_bytes: int
    memory_budget_bytes: int
    threads: int
    elapsed_s: float
    codec_s_per_byte: _containers.ScalarMap[str, float]
    def __init__(self, samples: _Optional[_Iterable[_Union[BlockSample, _Mapping]]] = ..., available_memory_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., codec_s_per_byte: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SinkReply(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class LinkTestRequest(_message.Message):
    __slots__ = ("peer", "bytes", "pings")
    PEER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PINGS_FIELD_NUMBER: _ClassVar[int]
    peer: str
    bytes: int
    pings: int
    def __init__(self, peer: _Optional[str] = ..., bytes: _Optional[int] = ..., pings: _Optional[int] = ...) -> None: ...

class LinkTestReply(_message.Message):
    __slots__ = ("bandwidth_bps", "latency_s", "bytes", "seconds")
    BANDWIDTH_BPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bandwidth_bps: float
    latency_s: float
    bytes: int
    seconds: float
    def __init__(self, bandwidth_bps: _Optional[float] = ..., latency_s: _Optional[float] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

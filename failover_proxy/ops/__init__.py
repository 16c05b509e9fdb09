"""Operations beside the data plane: metrics, access log, admin API, history, audit, drill."""

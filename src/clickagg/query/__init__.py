"""The query role: what the HTTP layer reads aggregates through. Adapters live one per
module beside the backend they wrap (``clickagg.store.rpc``)."""

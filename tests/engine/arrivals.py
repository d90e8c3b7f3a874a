"""Staggered arrivals shared by the engine tests: some requests at once, the rest joining mid-decode, some
aborted on a later step."""


def serve_staggered(engine, requests, first: int, join_step: int = 3, abort: tuple = (), abort_step: int = 5):
    """Every RequestOutput per request id: `requests[:first]` are added before the first step, the rest before
    step `join_step`, and the requests in `abort` are aborted before step `abort_step`."""
    outputs = {r.request_id: [] for r in requests}
    for request in requests[:first]:
        engine.add_request(request)
    step = 0
    while engine.has_work():
        step += 1
        if step == join_step:
            for request in requests[first:]:
                engine.add_request(request)
        if step == abort_step:
            for request in abort:
                engine.abort(request.request_id)
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs

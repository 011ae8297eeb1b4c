"""Analysis of recorded calls: traffic model, evidence-backed recommendations, what-if.

Everything is aggregated in ClickHouse (analysis.scope.Scope.calls is the one
source of rows); pandas only sees aggregated results.

    from meshlens.collector.stores import connect
    from meshlens.analysis import Window, analyze, recommend, open_scope
    store = connect("http://127.0.0.1:8123/"); store.use_database()
    report = recommend(store, Window.last(timedelta(hours=1)))
    report.frame()                      # one row per recommendation
    istio_yaml(report)                  # VirtualService / DestinationRule / PeerAuthentication
"""
from meshlens.analysis.evidence import Evidence, Recommendation
from meshlens.analysis.istio import istio_yaml
from meshlens.analysis.recommend import Report, TrafficModel, analyze, recommend
from meshlens.analysis.scope import NoData, Scope, UnknownService, open_scope
from meshlens.analysis.window import Window, parse_duration, parse_time

__all__ = ["Evidence", "NoData", "Recommendation", "Report", "Scope", "TrafficModel", "UnknownService", "Window",
           "analyze", "istio_yaml", "open_scope", "parse_duration", "parse_time", "recommend"]

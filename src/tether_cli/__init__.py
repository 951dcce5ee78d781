"""tetherctl: the operator's terminal client over Tether's REST API."""

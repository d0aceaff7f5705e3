"""The schemas Istio's CRD file does not carry, in the same OpenAPI v3 form as the CRDs.

Kubernetes `ObjectMeta` and core `v1 Service`, and minimesh's own `minimesh.dev/v1` kinds
`MeshConfig` and `RouteTest`; `schema.py` checks documents of these kinds like Istio's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Schema = Mapping[str, Any]

MINIMESH_GROUP = "minimesh.dev"

_STRING: Schema = {"type": "string"}
_BOOLEAN: Schema = {"type": "boolean"}
_STRING_LIST: Schema = {"type": "array", "items": _STRING}
_STRING_MAP: Schema = {"type": "object", "additionalProperties": _STRING}
_PORT_NUMBER: Schema = {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535}
_TIMESTAMP: Schema = {"type": "string", "format": "date-time", "nullable": True}

OBJECT_META: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _STRING,
        "generateName": _STRING,
        "namespace": _STRING,
        "selfLink": _STRING,
        "uid": _STRING,
        "resourceVersion": _STRING,
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": _TIMESTAMP,
        "deletionTimestamp": _TIMESTAMP,
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": _STRING_LIST,
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["apiVersion", "kind", "name", "uid"],
                "properties": {
                    "apiVersion": _STRING,
                    "kind": _STRING,
                    "name": _STRING,
                    "uid": _STRING,
                    "controller": _BOOLEAN,
                    "blockOwnerDeletion": _BOOLEAN,
                },
            },
        },
        "managedFields": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    },
}

_SERVICE_PORT: Schema = {
    "type": "object",
    "required": ["port"],
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "port": _PORT_NUMBER,
        "targetPort": {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string ? self.size() > 0 : (0 < self && self <= 65535)",
                    "message": "targetPort must be a port number 1-65535 or the name of a container port",
                }
            ],
        },
        "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]},
        "appProtocol": _STRING,
        "nodePort": _PORT_NUMBER,
    },
}

SERVICE: Schema = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.type) && self.type == 'ExternalName')"
                    " || (has(self.clusterIP) && self.clusterIP == 'None')"
                    " || (has(self.ports) && self.ports.size() > 0)",
                    "message": "a Service needs at least one entry in ports, unless it is headless"
                    " (clusterIP: None) or of type ExternalName",
                }
            ],
            "properties": {
                "selector": _STRING_MAP,
                "ports": {
                    "type": "array",
                    "items": _SERVICE_PORT,
                    "x-kubernetes-validations": [
                        {
                            "rule": "self.size() <= 1 || self.all(p, has(p.name) && p.name != '')",
                            "message": "a Service with more than one port needs a name on every port",
                        },
                        {
                            "rule": "self.all(p, !has(p.name) || self.exists_one(q, has(q.name) && q.name == p.name))",
                            "message": "port names must be unique within a Service",
                        },
                    ],
                },
                "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
                "clusterIP": _STRING,
                "clusterIPs": _STRING_LIST,
                "externalName": _STRING,
                "externalIPs": _STRING_LIST,
                "sessionAffinity": {"type": "string", "enum": ["ClientIP", "None"]},
                "sessionAffinityConfig": {
                    "type": "object",
                    "properties": {
                        "clientIP": {
                            "type": "object",
                            "properties": {
                                "timeoutSeconds": {
                                    "type": "integer",
                                    "format": "int32",
                                    "minimum": 1,
                                    "maximum": 86400,
                                }
                            },
                        }
                    },
                },
                "externalTrafficPolicy": {"type": "string", "enum": ["Cluster", "Local"]},
                "internalTrafficPolicy": {"type": "string", "enum": ["Cluster", "Local"]},
                "healthCheckNodePort": _PORT_NUMBER,
                "publishNotReadyAddresses": _BOOLEAN,
                "ipFamilies": {"type": "array", "items": {"type": "string", "enum": ["IPv4", "IPv6"]}},
                "ipFamilyPolicy": {
                    "type": "string",
                    "enum": ["SingleStack", "PreferDualStack", "RequireDualStack"],
                },
                "loadBalancerIP": _STRING,
                "loadBalancerSourceRanges": _STRING_LIST,
                "loadBalancerClass": _STRING,
                "allocateLoadBalancerNodePorts": _BOOLEAN,
                "trafficDistribution": _STRING,
            },
        },
    },
}


def mesh_config(http_retry: Schema) -> Schema:
    """`MeshConfig`, whose `defaultRetry` has exactly the shape of Istio's HTTPRetry (`http_retry`)."""
    return {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "outboundTrafficPolicy": {
                        "type": "object",
                        "properties": {"mode": {"type": "string", "enum": ["ALLOW_ANY", "REGISTRY_ONLY"]}},
                    },
                    "defaultRetry": http_retry,
                    "accessLogFile": {"type": "string", "default": "/dev/stdout"},
                    "accessLogEncoding": {"type": "string", "enum": ["TEXT", "JSON"]},
                },
            },
        },
    }


ROUTE_TEST: Schema = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["request", "expect"],
            "properties": {
                "request": {
                    "type": "object",
                    "required": ["url"],
                    "properties": {
                        "method": {"type": "string", "default": "GET"},
                        "url": _STRING,
                        "headers": _STRING_MAP,
                        "sourceLabels": _STRING_MAP,
                        "gateway": _STRING,
                    },
                },
                "expect": {
                    "type": "object",
                    "properties": {
                        "host": _STRING,
                        "subset": _STRING,
                        "status": {"type": "integer", "minimum": 100, "maximum": 599},
                        "port": _PORT_NUMBER,
                        "route": _STRING,
                        "fault": {"type": "string", "enum": ["abort", "delay", "none"]},
                    },
                },
            },
        },
    },
}

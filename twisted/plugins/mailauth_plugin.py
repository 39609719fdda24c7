"""twistd plugin: C{twistd mailauth --config PATH}."""

from twisted.application.service import ServiceMaker

mailauth = ServiceMaker(
    "mailauth", "mailauth.tap", "SMTP submission server with SMTP AUTH", "mailauth"
)

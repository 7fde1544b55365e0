"""A Docker registry token service (the realm of a registry's Bearer challenge),
as Docker Hub, GHCR and Harbor run one, for the pull tests:

    python scripts/token_server.py PORT KEY_PEM CERT_PEM ISSUER SERVICE USER:PASSWORD

GET /token?service=SERVICE&scope=repository:NAME:pull answers {"token", "access_token"}:
a JWT (RS256, signed with openssl, the certificate in its x5c header, which the
registry verifies against its rootcertbundle). A request with the user's Basic
credentials gets pull access to the repositories it asks for; an anonymous one
gets a token with no access (the registry then refuses the pull); wrong
credentials get 401.
"""

import base64
import http.server
import json
import subprocess
import sys
import time
import urllib.parse
import uuid

PORT, KEY, CERT, ISSUER, SERVICE, USER = sys.argv[1:7]


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der():
    pem = open(CERT).read()
    body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    return base64.b64decode("".join(body.split()))


def token(subject, access):
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der()).decode()]}
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
              "jti": uuid.uuid4().hex, "access": access}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", KEY], input=signing_input.encode(),
                               capture_output=True, check=True).stdout
    return f"{signing_input}.{b64url(signature)}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path != "/token" or query.get("service") != [SERVICE]:
            return self.answer(404, {"errors": [{"code": "NOT_FOUND"}]})
        auth = self.headers.get("Authorization", "")
        subject, access = "", []
        if auth.startswith("Basic "):
            if base64.b64decode(auth[6:]).decode() != USER:
                return self.answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            subject = USER.split(":")[0]
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":")
                access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a == "pull"]})
        t = token(subject, access)
        self.answer(200, {"token": t, "access_token": t, "expires_in": 300})


http.server.ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler).serve_forever()

"""The code `keyswap code` prints: for a proxy made from a template whose official SDK can
take keyswap's URL, that SDK; otherwise a plain HTTP call. Either way a request the
proxy's methods and rules allow (as the gateway decides it), with the token read from
$KEYSWAP_TOKEN, never written in the snippet."""

from __future__ import annotations

from dataclasses import dataclass

from keyswap.config.model import Proxy
from keyswap.gateway.stages.policy import UNSAFE_METHODS, rule_path, rule_verdict

LANGS = ("curl", "go", "javascript", "python")
TOKEN_PY = 'os.environ["KEYSWAP_TOKEN"]'
TOKEN_JS = "process.env.KEYSWAP_TOKEN"


@dataclass(frozen=True)
class Call:
    """A request a snippet makes: method and path after the proxy's route, and the SDK's
    code for it (after the client is made), where an SDK is used."""

    method: str
    path: str
    python: str = ""
    javascript: str = ""


@dataclass(frozen=True)
class Sdk:
    """A template's official SDK, given keyswap's URL as its base URL and the proxy token
    as its API key (keyswap accepts the token where the real API expects its key)."""

    python: str
    javascript: str | None  # None: this SDK cannot take a base URL with a path
    calls: tuple[Call, ...]  # the first one the proxy allows is used

    def speaks(self, lang: str) -> bool:
        return lang == "python" or (lang == "javascript" and self.javascript is not None)


_ROUTE_PY = "# keyswap's URL for this proxy; the proxy token stands in for the API key\n"
_ROUTE_JS = "// keyswap's URL for this proxy; the proxy token stands in for the API key\n"


def _client_py(imports: str, cls: str, base_arg: str) -> str:
    return (
        f"import os\n\n{imports}\n\n{_ROUTE_PY}"
        f'client = {cls}(\n    {base_arg}="{{base}}",\n    api_key={TOKEN_PY},\n)\n'
    )


def _client_js(imports: str, cls: str) -> str:
    return (
        f"{imports}\n\n{_ROUTE_JS}"
        f'const client = new {cls}({{{{\n  baseURL: "{{base}}",\n  apiKey: {TOKEN_JS},\n}}}});\n'
    )


_LIST_PY = "{0} = client.{1}.list()\nprint([{2}.id for {2} in {0}])\n"
_LIST_JS = "const {0} = await client.{1}.list();\nconsole.log({0}.data.map(({2}) => {2}.id));\n"
SDKS = {
    "openai": Sdk(
        python=_client_py("from openai import OpenAI", "OpenAI", "base_url"),
        javascript=_client_js('import OpenAI from "openai";', "OpenAI"),
        calls=(
            Call(
                "GET",
                "/models",
                _LIST_PY.format("models", "models", "model"),
                _LIST_JS.format("models", "models", "model"),
            ),
            Call(
                "POST",
                "/chat/completions",
                "completion = client.chat.completions.create(\n"
                '    model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]\n'
                ")\nprint(completion.choices[0].message.content)\n",
                "const completion = await client.chat.completions.create({{\n"
                '  model: "gpt-4o-mini",\n  messages: [{{ role: "user", content: "Hello" }}],\n'
                "}});\nconsole.log(completion.choices[0].message.content);\n",
            ),
        ),
    ),
    "anthropic": Sdk(
        python=_client_py("from anthropic import Anthropic", "Anthropic", "base_url"),
        javascript=_client_js('import Anthropic from "@anthropic-ai/sdk";', "Anthropic"),
        calls=(
            Call(
                "GET",
                "/v1/models",
                _LIST_PY.format("models", "models", "model"),
                _LIST_JS.format("models", "models", "model"),
            ),
            Call(
                "POST",
                "/v1/messages",
                "message = client.messages.create(\n"
                '    model="claude-3-5-haiku-latest",\n    max_tokens=256,\n'
                '    messages=[{{"role": "user", "content": "Hello"}}],\n'
                ")\nprint(message.content[0].text)\n",
                "const message = await client.messages.create({{\n"
                '  model: "claude-3-5-haiku-latest",\n  max_tokens: 256,\n'
                '  messages: [{{ role: "user", content: "Hello" }}],\n'
                "}});\nconsole.log(message.content[0].text);\n",
            ),
        ),
    ),
    "stripe": Sdk(
        python=(
            f"import os\n\nfrom stripe import StripeClient\n\n{_ROUTE_PY}"
            f"client = StripeClient(\n    {TOKEN_PY},\n"
            '    base_addresses={{"api": "{base}"}},\n)\n'
        ),
        javascript=None,  # stripe-node takes a host and a port, not a path
        calls=(
            Call(
                "GET",
                "/v1/customers",
                'customers = client.v1.customers.list(params={{"limit": 3}})\n'
                "print([customer.id for customer in customers.data])\n",
            ),
            Call(
                "GET",
                "/v1/balance",
                "balance = client.v1.balance.retrieve()\nprint(balance.available)\n",
            ),
        ),
    ),
}
# The other templates' APIs: a harmless read, as a plain HTTP call.
TEMPLATE_CALLS = {
    "github": Call("GET", "/user"),
    "hubspot": Call("GET", "/crm/v3/owners"),
    "slack": Call("GET", "/auth.test"),
    "twilio": Call("GET", "/Accounts.json"),
    "sendgrid": Call("GET", "/scopes"),
    "google": Call("GET", "/oauth2/v3/userinfo"),
}

_PLAIN = {
    "curl": 'curl -sS{method} "{url}" -H "Authorization: Bearer ${{KEYSWAP_TOKEN}}"\n',
    "python": (
        "import os\n\nimport httpx\n\n"
        "response = httpx.{verb}(\n"
        '    "{url}",\n'
        '    headers={{"Authorization": f"Bearer {{os.environ[\'KEYSWAP_TOKEN\']}}"}},\n)\n'
        'print(response.status_code, response.headers.get("keyswap-proxy-code"))\n'
        "print(response.text)\n"
    ),
    "javascript": (
        'const response = await fetch("{url}", {{\n{method}'
        "  headers: {{ Authorization: `Bearer ${{process.env.KEYSWAP_TOKEN}}` }},\n}});\n"
        'console.log(response.status, response.headers.get("keyswap-proxy-code"));\n'
        "console.log(await response.text());\n"
    ),
    "go": (
        'package main\n\nimport (\n\t"fmt"\n\t"io"\n\t"net/http"\n\t"os"\n)\n\n'
        "func main() {{\n"
        '\treq, _ := http.NewRequest("{verb_upper}", "{url}", nil)\n'
        '\treq.Header.Set("Authorization", "Bearer "+os.Getenv("KEYSWAP_TOKEN"))\n'
        "\tresp, err := http.DefaultClient.Do(req)\n\tif err != nil {{\n\t\tpanic(err)\n\t}}\n"
        "\tdefer resp.Body.Close()\n\tbody, _ := io.ReadAll(resp.Body)\n"
        '\tfmt.Println(resp.StatusCode, resp.Header.Get("keyswap-proxy-code"))\n'
        "\tfmt.Println(string(body))\n}}\n"
    ),
}
_HTTPX_VERBS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def allows(proxy: Proxy, method: str, path: str) -> bool:
    """Whether the proxy's methods and rules let `method path` through, as the policy
    stage decides it (path: after the route, without a query)."""
    if proxy.methods is not None and method not in proxy.methods:
        return False
    if proxy.methods is None and method in UNSAFE_METHODS:
        return False
    rule = rule_verdict(proxy.rules, method, rule_path(path))
    return rule is None or rule.action == "allow"


def _rule_calls(proxy: Proxy) -> list[Call]:
    """Requests made from the proxy's allow rules, then one to the target's root."""
    calls = []
    for rule in proxy.rules:
        pattern = rule.match.path
        if rule.action != "allow" or pattern is None:
            continue
        path = pattern.removesuffix("/**").replace("**", "x").replace("*", "x") or "/"
        methods = rule.match.methods or proxy.methods or ["GET"]
        calls += [Call(m, path if path.startswith("/") else "/" + path) for m in methods]
    return [*calls, *(Call(m, "/") for m in proxy.methods or ["GET"])]


def choose(proxy: Proxy, method: str | None, path: str | None) -> tuple[Call, Sdk | None]:
    """The request a snippet makes, and the SDK that makes it (None: a plain HTTP call):
    the one asked for, else the first of the template's calls, or of calls made from the
    rules, that the proxy allows. When nothing is allowed, the first one asked or tried."""
    if path is not None or method is not None:
        methods = proxy.methods or ["GET"]
        if method:
            methods = [method.upper()]
        elif "GET" in methods:
            methods = ["GET"]
        tried = [Call(m, path or "/") for m in methods]
        return next((c for c in tried if allows(proxy, c.method, c.path)), tried[0]), None
    sdk = SDKS.get(proxy.template or "")
    if sdk is not None:
        for call in sdk.calls:
            if allows(proxy, call.method, call.path):
                return call, sdk
    known = TEMPLATE_CALLS.get(proxy.template or "")
    tried = ([known] if known else []) + _rule_calls(proxy)
    return next((c for c in tried if allows(proxy, c.method, c.path)), tried[0]), None


def snippet(lang: str, base: str, call: Call, sdk: Sdk | None) -> str:
    """The code in `lang` that makes `call` through the proxy at `base` (the gateway's URL
    with the proxy's route)."""
    if sdk is not None and sdk.speaks(lang):
        client, code = (
            (sdk.python, call.python) if lang == "python" else (sdk.javascript, call.javascript)
        )
        return f"{client}\n{code}".format(base=base)
    if sdk is not None and lang == "javascript":
        note = "// this API's SDK cannot take keyswap's URL (a path): a plain request\n"
        return note + _plain(lang, base, call)
    return _plain(lang, base, call)


def _plain(lang: str, base: str, call: Call) -> str:
    method = call.method.upper()
    verb = method.lower() if method in _HTTPX_VERBS else None
    text = _PLAIN[lang]
    if lang == "python" and verb is None:
        text = text.replace("httpx.{verb}(\n", 'httpx.request(\n    "{verb_upper}",\n')
    option = {
        "curl": "" if method == "GET" else f" -X {method}",
        "javascript": "" if method == "GET" else f'  method: "{method}",\n',
    }.get(lang, "")
    return text.format(url=base + call.path, verb=verb, verb_upper=method, method=option)

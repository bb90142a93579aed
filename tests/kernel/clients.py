"""Lab client programs shared by kernel test modules (a module, not conftest.py)."""


def gemini_client(key: str, text: str) -> str:
    """A stdlib Gemini generateContent client (API key in the query string, 5 output tokens) that
    prints the prompt and candidate token counts the lab answered with."""
    return f"""
import http.client, json, ssl
c = http.client.HTTPSConnection("generativelanguage.googleapis.com", 443, context=ssl.create_default_context())
body = json.dumps({{"contents": [{{"parts": [{{"text": {text!r}}}]}}],
                   "generationConfig": {{"maxOutputTokens": 5}}}})
c.request("POST", "/v1beta/models/gemini-1.5-flash:generateContent?key={key}", body=body,
          headers={{"Content-Type": "application/json"}})
u = json.loads(c.getresponse().read())["usageMetadata"]
print(u["promptTokenCount"], u["candidatesTokenCount"])
"""

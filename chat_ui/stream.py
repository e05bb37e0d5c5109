"""A reply's tokens to the page outside Gradio's queue: a plain streaming route served by the
app's own process (registered before Gradio's routes) and the page's script that reads it.

Through Gradio's queue every streamed update costs the app ~0.35 ms of CPU (~4 ms per event);
here an update is one small SSE line (~0.02 ms), coalesced to a few a second per reader. Gradio
events remain where the page's state changes: a message sent (it returns the reply's token), a
reply finished (the chat as saved), Stop, Clear, a chat switched.

    GET <page>/chat/stream/<token>   text/event-stream, one JSON object per event:
        {"text": the reply so far, "stats": ...}   first
        {"add": what came since, "stats": ...}      then
        {..., "done": true}                         last: the reply is saved

The token is the reply's unguessable name, given only to the page that sent the message; a
reader that goes away before the end stops the reply (as closing the page did), and what came is
saved.

In the page, a hidden `gr.HTML` holds the reader (READER, its js_on_load): a message sent sets
its value to {"kind": "start", "token"}, an action that takes the chat over to {"kind": "stop"}.
Each update it reads becomes its value, which a browser-only event (APPLY) puts into the chat
window, so the reply renders as the chat window renders any message (Markdown, LaTeX); at the
end it fires its `submit` event, which shows the chat as the store has it.
"""
from __future__ import annotations

import json
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conversation import Conversations
from .history import CUT_NOTE
from .visitors import visitor_of

STREAM_PATH = "/chat/stream"


def stream_route(conversations: Conversations) -> Route:
    async def endpoint(request: Request):
        live = conversations.reply(request.path_params["token"])
        if live is None:
            return JSONResponse({"error": "no such reply (it ended a while ago, or never was)"}, status_code=404)

        async def events():
            sent = None
            async for r in conversations.read(live):
                text = r.text
                event = {"text": text} if sent is None else {"add": text[sent:]}
                sent = len(text)
                event["stats"] = r.stats
                if r.done:
                    event["done"] = True
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return Route(STREAM_PATH + "/{token}", endpoint, methods=["GET"])


DOWNLOAD_PATH = "/chat/download"


def download_route(conversations: Conversations) -> Route:
    """GET <page>/chat/download/<token>: an export, once, to the browser that asked for it."""
    async def endpoint(request: Request):
        visitor = visitor_of(request.headers, request.client.host if request.client else None)
        got = conversations.downloads.take(request.path_params["token"], visitor)
        if got is None:
            return JSONResponse({"error": "no such download (it was fetched already, or expired: export again)"},
                                status_code=404)
        name, body = got
        return Response(body, media_type="application/octet-stream", headers={
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}", "Cache-Control": "no-store"})

    return Route(DOWNLOAD_PATH + "/{token}", endpoint, methods=["GET"])


def start_value(token: str) -> str:
    """The reader's value that makes it read the reply `token`."""
    return json.dumps({"kind": "start", "token": token})


STOP_VALUE = json.dumps({"kind": "stop"})  # the reader's value that makes it stop reading
STOP_READING = f"() => {json.dumps(STOP_VALUE)}"  # a browser-only step giving the reader that value

# js_on_load of the reader (element, trigger, props, server, upload, watch are given)
READER = ("""
let ctl = null;
async function read(token) {
  if (ctl) ctl.abort();
  const mine = new AbortController();
  ctl = mine; window.__chatReply = token;
  let text = '', stats = '…', buf = '', ended = false;
  try {
    const url = new URL('chat/stream/' + encodeURIComponent(token), document.baseURI);
    const resp = await fetch(url, {signal: mine.signal, cache: 'no-store'});
    if (!resp.ok) throw new Error('stream ' + resp.status);
    const reader = resp.body.getReader(), dec = new TextDecoder();
    for (;;) {
      const {value, done} = await reader.read();
      if (done || ctl !== mine) break;
      buf += dec.decode(value, {stream: true});
      let i, got = false;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!ev.startsWith('data: ')) continue;
        const d = JSON.parse(ev.slice(6));
        text = d.text !== undefined ? d.text : text + (d.add || '');
        stats = d.stats || stats; got = true; ended = ended || !!d.done;
      }
      if (got && ctl === mine) props.value = JSON.stringify({kind: 'update', token, text, stats});
    }
  } catch (e) { if (ctl !== mine) return; console.warn('reply stream:', e); }
  if (ctl !== mine) return;
  if (!ended)  // the app went away mid-reply: what came stays on screen, marked cut, and Send is back
    props.value = JSON.stringify({kind: 'update', token, broken: true, text: text + %s,
      stats: 'Cut off: the connection to the app broke. What came is kept (the app saves it as it goes); ' +
             'send again once the page works.'});
  ctl = null; trigger('submit');
}
watch('value', () => {
  let v; try { v = JSON.parse(props.value || '{}'); } catch (e) { return; }
  if (v.kind === 'start') read(v.token);
  else if (v.kind === 'stop') { if (ctl) ctl.abort(); ctl = null; window.__chatReply = null; }
});
""" % json.dumps(CUT_NOTE))

# the browser-only event that shows an update: (reader's value, chat window, stats) -> those two
# and Send / Stop (an undefined output leaves that component as it is: the reader's other values
# change nothing; a reply cut by a lost connection puts Send back)
APPLY = """(live, hist, stats) => {
  const none = [undefined, undefined, undefined, undefined];
  let d; try { d = JSON.parse(live); } catch (e) { return none; }
  if (!d || d.kind !== 'update' || d.token !== window.__chatReply || !Array.isArray(hist) || !hist.length)
    return none;
  const h = hist.slice(), last = h[h.length - 1], content = [{type: 'text', text: d.text}];
  if (last.role === 'assistant') h[h.length - 1] = {...last, content};
  else h.push({role: 'assistant', metadata: null, content, options: null});
  if (!d.broken) return [h, d.stats || stats, undefined, undefined];
  return [h, d.stats, {__type__: 'update', visible: true}, {__type__: 'update', visible: false}];
}"""

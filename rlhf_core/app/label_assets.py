"""The one page of `rlhf label`: HTML, CSS and JavaScript in one string, no external assets
(the machines it runs on are often offline).

Every text from a model or a person is put on the page with `textContent`, never as HTML, so
an answer that holds `<script>` shows those characters and runs nothing. The page talks to
the server in JSON (`fetch`), and shows the server's `error` sentence when a request fails.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf label: which answer is better?</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 10px 24px; display: flex;
           align-items: center; gap: 24px; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; font-weight: 600; }
  header label { font-size: 14px; }
  header input { padding: 4px 6px; border-radius: 4px; border: 1px solid #888; }
  main { max-width: 1400px; margin: 0 auto; padding: 16px 24px; }
  section { background: #fff; border-radius: 8px; padding: 12px 16px; margin-bottom: 14px;
            box-shadow: 0 1px 2px rgba(0,0,0,.08); }
  h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .05em; color: #5b6475;
       margin: 0 0 8px; }
  .text { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 15px; line-height: 1.45; }
  .role { font-size: 12px; color: #5b6475; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
  .answers section { min-height: 120px; margin-bottom: 0; }
  .row { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: 6px;
             border: 1px solid #c6cbd4; border-radius: 4px; }
  button { font: inherit; padding: 7px 14px; border-radius: 5px; border: 1px solid #98a1b3;
           background: #fff; cursor: pointer; }
  button.vote { background: #2f5bd3; border-color: #2f5bd3; color: #fff; font-weight: 600; }
  button:disabled { opacity: .45; cursor: default; }
  #message { min-height: 22px; font-size: 14px; margin: 6px 0; }
  #message.error { color: #b3261e; font-weight: 600; }
  #message.ok { color: #1e7b34; }
  #reveal { font-size: 14px; color: #30384a; }
  #tally { font-size: 14px; }
  #tally div { margin: 2px 0; }
</style>
</head>
<body>
<header>
  <h1>Which answer is better?</h1>
  <label>Annotator id <input id="annotator" maxlength="64" placeholder="your id"
    autocomplete="off"></label>
  <span id="mode"></span>
</header>
<main>
  <section>
    <h2>Prompt</h2>
    <div id="prompt" class="text"></div>
    <div class="row" style="margin-top:10px">
      <button id="next">Next prompt from the set</button>
      <span class="role">or type your own:</span>
    </div>
    <textarea id="typed" rows="2" placeholder="Type a prompt, then Ask"></textarea>
    <div class="row"><button id="ask">Ask both</button></div>
  </section>
  <div class="answers">
    <section><h2>Answer A</h2><div id="answer-a" class="text"></div></section>
    <section><h2>Answer B</h2><div id="answer-b" class="text"></div></section>
  </div>
  <section style="margin-top:14px">
    <div class="row">
      <button class="vote" data-verdict="a">A is better</button>
      <button class="vote" data-verdict="b">B is better</button>
      <button class="vote" data-verdict="tie">Tie</button>
      <button class="vote" data-verdict="both_bad">Both bad</button>
    </div>
    <h2 style="margin-top:12px">A better answer (optional)</h2>
    <textarea id="better" rows="3"
      placeholder="The answer you would have wanted: saved as preferred over both"></textarea>
    <div id="message" role="status"></div>
    <div id="reveal"></div>
  </section>
  <section>
    <h2>Tally</h2>
    <div id="tally">No votes yet.</div>
  </section>
</main>
<script>
"use strict";
const byId = (id) => document.getElementById(id);
const annotator = byId("annotator");
let current = null;

annotator.value = localStorage.getItem("rlhf-label-annotator") || "";
annotator.addEventListener("input", () => {
  localStorage.setItem("rlhf-label-annotator", annotator.value.trim());
});

function say(text, kind) {
  const box = byId("message");
  box.textContent = text;
  box.className = kind;
}

async function call(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error("The server does not answer: is rlhf label still running?");
  }
  let data = {};
  try { data = await response.json(); } catch (error) { data = {}; }
  if (!response.ok) {
    throw new Error(data.error || ("The server answered " + response.status + "."));
  }
  return data;
}

function setVoting(enabled) {
  document.querySelectorAll("button.vote").forEach((button) => { button.disabled = !enabled; });
}

function showPrompt(messages) {
  const box = byId("prompt");
  box.textContent = "";
  messages.forEach((message) => {
    if (messages.length > 1) {
      const role = document.createElement("div");
      role.className = "role";
      role.textContent = message.role;
      box.appendChild(role);
    }
    const text = document.createElement("div");
    text.textContent = message.content;
    box.appendChild(text);
  });
}

async function load(typedPrompt) {
  setVoting(false);
  byId("reveal").textContent = "";
  say("Generating both answers…", "");
  const body = {annotator: annotator.value.trim()};
  if (typedPrompt !== undefined) body.prompt = typedPrompt;
  try {
    current = await call("/api/comparison", body);
  } catch (error) {
    say(error.message, "error");
    return;
  }
  showPrompt(current.prompt);
  byId("answer-a").textContent = current.answer_a;
  byId("answer-b").textContent = current.answer_b;
  byId("better").value = "";
  say("", "");
  setVoting(true);
}

async function vote(verdict) {
  if (!current) return;
  setVoting(false);
  const body = {comparison_id: current.id, verdict: verdict,
                annotator: annotator.value.trim(), better_answer: byId("better").value};
  try {
    const saved = await call("/api/vote", body);
    const rows = saved.rows === 1 ? "1 preference row" : saved.rows + " preference rows";
    say("Saved (vote " + saved.seq + ", " + rows + ")." +
        (saved.batch ? " Batch written: " + saved.batch : ""), "ok");
    byId("reveal").textContent = "A was " + saved.model_a + "; B was " + saved.model_b + ".";
    current = null;
    refreshTally();
  } catch (error) {
    say(error.message, "error");
    setVoting(true);
  }
}

function percent(value) { return (100 * value).toFixed(1) + "%"; }

async function refreshTally() {
  let tally;
  try { tally = await call("/api/tally"); } catch (error) { return; }
  const lines = [];
  const v = tally.verdicts;
  lines.push(tally.votes + " votes: A " + v.a + ", B " + v.b + ", tie " + v.tie +
             ", both bad " + v.both_bad + "; " + tally.pending + " not yet in a batch.");
  const h = tally.head_to_head;
  if (h && h.win_rate !== null) {
    lines.push(h.challenger + " vs " + h.incumbent + ": wins " + percent(h.win_rate) + " (95% CI " +
               percent(h.low) + " to " + percent(h.high) + ") over " + h.counted +
               " votes (" + h.wins + " won, " + h.losses + " lost, " + h.ties +
               (h.ties === 1 ? " tie" : " ties") + " counted ½; " + h.both_bad +
               " both bad left out).");
  } else if (h) {
    lines.push(h.challenger + " vs " + h.incumbent + ": no votes between them yet.");
  }
  const g = tally.agreement;
  lines.push(g.rate === null ? "Agreement: no pair has votes from two annotators yet." :
             "Agreement: " + percent(g.rate) + " of " + g.annotator_pairs +
             " annotator pairs on " + g.comparisons + " shared pairs.");
  const box = byId("tally");
  box.textContent = "";
  lines.forEach((line) => {
    const div = document.createElement("div");
    div.textContent = line;
    box.appendChild(div);
  });
}

document.querySelectorAll("button.vote").forEach((button) => {
  button.addEventListener("click", () => vote(button.dataset.verdict));
});
byId("next").addEventListener("click", () => load());
byId("ask").addEventListener("click", () => load(byId("typed").value));

call("/api/config").then((config) => {
  byId("mode").textContent = config.mode;
  if (config.annotator_required) annotator.placeholder = "your id (required)";
  if (config.prompt_set) { load(); } else {
    say("No prompt set: type a prompt and press Ask both.", "");
  }
  refreshTally();
}).catch((error) => say(error.message, "error"));
setVoting(false);
</script>
</body>
</html>
"""

// Markdown to DOM for model answers, safe by construction and cheap to re-run while streaming.
// Owns the block parser, the inline parser and the link policy; it never builds HTML strings.
//
// Every piece of text reaches the page through `textContent` or a text node, so nothing a model
// writes can become markup. Links are kept only for absolute http(s) URLs, and images are shown
// as links (loading them would make the browser fetch from other hosts).
//
// `renderMarkdown(container, text)` may be called with a growing text as tokens arrive: blocks
// whose source did not change keep their DOM nodes (and with them focus and text selection),
// so only the block being written is rebuilt. An unclosed code fence renders as a code block.

const FENCE_OPEN = /^( {0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$/;
const FENCE_CLOSE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$/;
const QUOTE = /^ {0,3}>[ \t]?(.*)$/;
const LIST_ITEM = /^( {0,3})([-+*]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const ASCII_PUNCT = /[!-/:-@[-`{-~]/;
const PUNCT = /[\p{P}\p{S}]/u;
const SPACE = /\s/;
const BARE_URL = /^https?:\/\/[^\s<>"'`]+/;
const URL_TRAILER = /[.,:;!?'"*_~]+$/;

/** The URL as the browser will use it if it is absolute http(s); otherwise null. */
export function safeHref(raw) {
  let url;
  try {
    url = new URL(String(raw).trim());
  } catch {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

/** Render `text` into `container`, reusing the DOM of blocks that did not change. */
export function renderMarkdown(container, text) {
  const blocks = parseBlocks(splitLines(text));
  const previous = rendered.get(container) || [];
  const next = [];
  let k = 0;
  while (k < blocks.length && k < previous.length && previous[k].key === blocks[k].key) {
    next.push(previous[k]);
    k++;
  }
  for (let r = k; r < previous.length; r++) previous[r].node.remove();
  for (; k < blocks.length; k++) {
    const node = blockNode(blocks[k]);
    container.appendChild(node);
    next.push({ key: blocks[k].key, node });
  }
  rendered.set(container, next);
}

/** A fragment for `text`, for one-off rendering (history, tests). */
export function markdownFragment(text) {
  const fragment = document.createDocumentFragment();
  for (const block of parseBlocks(splitLines(text))) fragment.appendChild(blockNode(block));
  return fragment;
}

const rendered = new WeakMap();

function splitLines(text) {
  return String(text)
    .replace(/\r\n?/g, "\n")
    .split("\n")
    .map((line) => line.replace(/^[ \t]+/, (lead) => lead.replace(/\t/g, "    ")));
}

const isBlank = (line) => /^[ \t]*$/.test(line);
const indentOf = (line) => line.length - line.trimStart().length;

function dedent(line, width) {
  const take = Math.min(width, indentOf(line));
  return line.slice(take);
}

function listMarker(line) {
  const m = LIST_ITEM.exec(line);
  if (!m) return null;
  const [, lead, marker, gap = "", rest = ""] = m;
  if (!gap && rest) return null;
  const ordered = /\d/.test(marker[0]);
  const gapWidth = gap.length === 0 || gap.length > 4 ? 1 : gap.length;
  return {
    ordered,
    kind: ordered ? marker.slice(-1) : marker,
    start: ordered ? parseInt(marker, 10) : 1,
    indent: lead.length + marker.length + gapWidth,
    content: gap.length > 4 ? gap.slice(1) + rest : rest,
  };
}

function isTableStart(lines, i) {
  if (i + 1 >= lines.length || !lines[i].includes("|") || !TABLE_RULE.test(lines[i + 1])) {
    return false;
  }
  return splitRow(lines[i]).length === splitRow(lines[i + 1]).length;
}

/** Does this line end a paragraph by starting another block? */
function interrupts(lines, i) {
  const line = lines[i];
  if (FENCE_OPEN.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)) {
    return true;
  }
  const item = listMarker(line);
  if (item && item.content.trim() && (!item.ordered || item.start === 1)) return true;
  return isTableStart(lines, i);
}

function parseBlocks(lines) {
  const blocks = [];
  let i = 0;
  const push = (block, start, end) => {
    block.key = block.type + "\u0000" + lines.slice(start, end).join("\n");
    blocks.push(block);
  };
  while (i < lines.length) {
    const line = lines[i];
    const start = i;
    let m;
    if (isBlank(line)) {
      i++;
    } else if ((m = FENCE_OPEN.exec(line))) {
      const [, lead, fence, lang] = m;
      const body = [];
      let closed = false;
      for (i++; i < lines.length; i++) {
        const close = FENCE_CLOSE.exec(lines[i]);
        if (close && close[1][0] === fence[0] && close[1].length >= fence.length) {
          closed = true;
          i++;
          break;
        }
        body.push(dedent(lines[i], lead.length));
      }
      push({ type: "code", lang, code: body.join("\n"), closed }, start, i);
    } else if ((m = HEADING.exec(line))) {
      push({ type: "heading", level: m[1].length, text: m[2] || "" }, start, ++i);
    } else if (RULE.test(line)) {
      push({ type: "rule" }, start, ++i);
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const q = QUOTE.exec(lines[i]);
        if (q) inner.push(q[1]);
        else if (inner.length && !interrupts(lines, i)) inner.push(lines[i]); // lazy line
        else break;
        i++;
      }
      push({ type: "quote", children: parseBlocks(inner) }, start, i);
    } else if (listMarker(line)) {
      i = parseList(lines, i, (block, end) => push(block, start, end));
    } else if (isTableStart(lines, i)) {
      const head = splitRow(lines[i]);
      const align = splitRow(lines[i + 1]).map((cell) => {
        const left = cell.startsWith(":");
        const right = cell.endsWith(":");
        return left && right ? "center" : right ? "right" : left ? "left" : "";
      });
      const rows = [];
      for (i += 2; i < lines.length && !isBlank(lines[i]) && !interrupts(lines, i); i++) {
        rows.push(splitRow(lines[i]));
      }
      push({ type: "table", head, align, rows }, start, i);
    } else {
      const text = [line.trim()];
      for (i++; i < lines.length && !isBlank(lines[i]) && !interrupts(lines, i); i++) {
        text.push(lines[i].trim());
      }
      push({ type: "paragraph", text: text.join("\n") }, start, i);
    }
  }
  return blocks;
}

function parseList(lines, i, done) {
  const first = listMarker(lines[i]);
  const items = [];
  let tight = true;
  while (i < lines.length) {
    const item = listMarker(lines[i]);
    if (!item || item.ordered !== first.ordered || item.kind !== first.kind) break;
    if (RULE.test(lines[i])) break;
    const body = [item.content];
    for (i++; i < lines.length; i++) {
      const line = lines[i];
      if (isBlank(line)) {
        body.push("");
      } else if (indentOf(line) >= item.indent) {
        body.push(dedent(line, item.indent));
      } else if (body[body.length - 1] === "" || listMarker(line) || interrupts(lines, i)) {
        break;
      } else {
        body.push(line.trim()); // lazy continuation of the item's paragraph
      }
    }
    let trailing = 0;
    while (body.length && body[body.length - 1] === "") {
      body.pop();
      trailing++;
    }
    const children = parseBlocks(body);
    if (body.includes("") && children.length > 1) tight = false;
    items.push(children);
    const following = i < lines.length ? listMarker(lines[i]) : null;
    const continues = following && following.ordered === first.ordered
      && following.kind === first.kind && !RULE.test(lines[i]);
    if (!continues) break;
    if (trailing) tight = false;
  }
  // Trailing blank lines were consumed by the last item; they belong to no block.
  let end = i;
  while (end > 0 && isBlank(lines[end - 1])) end--;
  done({ type: "list", ordered: first.ordered, start: first.start, tight, items }, end);
  return i;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  const cells = [];
  let cell = "";
  let ticks = 0;
  for (let i = 0; i < row.length; i++) {
    const c = row[i];
    if (c === "\\" && row[i + 1] === "|") {
      cell += "|";
      i++;
    } else if (c === "`") {
      ticks = ticks ? 0 : 1;
      cell += c;
    } else if (c === "|" && !ticks) {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += c;
    }
  }
  cells.push(cell.trim());
  return cells;
}

// ---- DOM ---------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function blockNode(block) {
  switch (block.type) {
    case "heading": {
      // Answers sit under the page's own h1/h2, so their headings start at h3.
      const node = el(`h${Math.min(block.level + 2, 6)}`, `md-h${block.level}`);
      node.append(...inline(block.text));
      return node;
    }
    case "paragraph": {
      const node = el("p");
      node.append(...inline(block.text));
      return node;
    }
    case "rule":
      return el("hr");
    case "code":
      return codeBlock(block);
    case "quote": {
      const node = el("blockquote");
      for (const child of block.children) node.appendChild(blockNode(child));
      return node;
    }
    case "list": {
      const node = el(block.ordered ? "ol" : "ul");
      if (block.ordered && block.start !== 1) node.start = block.start;
      for (const children of block.items) {
        const li = el("li");
        for (const child of children) {
          if (block.tight && child.type === "paragraph") {
            if (li.childNodes.length) li.appendChild(el("br"));
            li.append(...inline(child.text));
          } else {
            li.appendChild(blockNode(child));
          }
        }
        node.appendChild(li);
      }
      return node;
    }
    case "table":
      return table(block);
    default:
      return el("p", "", "");
  }
}

function codeBlock(block) {
  const wrap = el("div", "md-code");
  const bar = el("div", "md-code-bar");
  const lang = el("span", "md-code-lang", block.lang || "code");
  const copy = el("button", "md-copy", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy ${block.lang ? block.lang + " " : ""}code`);
  copy.addEventListener("click", () => copyText(block.code, copy));
  bar.append(lang, copy);
  const pre = el("pre");
  pre.tabIndex = 0; // long lines scroll sideways; the keyboard must be able to scroll them too
  const code = el("code", block.lang ? `language-${block.lang.replace(/[^\w+#.-]/g, "")}` : "");
  code.textContent = block.code;
  pre.appendChild(code);
  wrap.append(bar, pre);
  return wrap;
}

async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // No clipboard API outside secure contexts (plain http on a LAN address): fall back.
    const area = el("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

function table(block) {
  const scroller = el("div", "md-table");
  const node = el("table");
  const thead = el("thead");
  const headRow = el("tr");
  block.head.forEach((cell, c) => {
    const th = el("th");
    th.scope = "col";
    if (block.align[c]) th.style.textAlign = block.align[c];
    th.append(...inline(cell));
    headRow.appendChild(th);
  });
  thead.appendChild(headRow);
  const tbody = el("tbody");
  for (const row of block.rows) {
    const tr = el("tr");
    for (let c = 0; c < block.head.length; c++) {
      const td = el("td");
      if (block.align[c]) td.style.textAlign = block.align[c];
      td.append(...inline(row[c] || ""));
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
  node.append(thead, tbody);
  scroller.appendChild(node);
  return scroller;
}

// ---- inline ------------------------------------------------------------------------------

/** Inline markdown to an array of DOM nodes. */
export function inline(text, noLinks = false) {
  const items = scanInline(text, noLinks);
  resolveEmphasis(items);
  return toNodes(items);
}

function scanInline(text, noLinks) {
  const items = [];
  let buf = "";
  const flush = () => {
    if (buf) items.push({ kind: "text", text: buf });
    buf = "";
  };
  const atom = (node) => {
    flush();
    items.push({ kind: "node", node });
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && ASCII_PUNCT.test(text[i + 1])) {
      buf += text[i + 1];
      i += 2;
    } else if (c === "\n") {
      buf = buf.replace(/ +$/, "");
      atom(el("br"));
      i++;
    } else if (c === "`") {
      const run = runLength(text, i, "`");
      const close = closingTicks(text, i + run, run);
      if (close < 0) {
        buf += "`".repeat(run);
        i += run;
        continue;
      }
      let code = text.slice(i + run, close).replace(/\n/g, " ");
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) {
        code = code.slice(1, -1);
      }
      atom(el("code", "", code));
      i = close + run;
    } else if (!noLinks && (c === "[" || (c === "!" && text[i + 1] === "["))
               && parseLink(text, c === "!" ? i + 1 : i)) {
      const link = parseLink(text, c === "!" ? i + 1 : i);
      atom(linkNode(link, c === "!"));
      i = link.end;
    } else if (!noLinks && c === "<" && /^<https?:\/\/[^\s<>]+>/.test(text.slice(i, i + 2048))) {
      const url = /^<(https?:\/\/[^\s<>]+)>/.exec(text.slice(i, i + 2048))[1];
      atom(linkNode({ label: url, url, title: "", plain: true }, false));
      i += url.length + 2;
    } else if (!noLinks && c === "h" && !/\w/.test(text[i - 1] || "") && text.startsWith("http", i)
               && BARE_URL.test(text.slice(i, i + 2048))) {
      let url = BARE_URL.exec(text.slice(i, i + 2048))[0].replace(URL_TRAILER, "");
      while (url.endsWith(")") && count(url, "(") < count(url, ")")) url = url.slice(0, -1);
      atom(linkNode({ label: url, url, title: "", plain: true }, false));
      i += url.length;
    } else if (c === "*" || c === "_" || c === "~") {
      const run = runLength(text, i, c);
      const before = i > 0 ? text[i - 1] : " ";
      const after = i + run < text.length ? text[i + run] : " ";
      const ws = (ch) => SPACE.test(ch);
      const punct = (ch) => PUNCT.test(ch);
      const left = !ws(after) && (!punct(after) || ws(before) || punct(before));
      const right = !ws(before) && (!punct(before) || ws(after) || punct(after));
      let canOpen = left;
      let canClose = right;
      if (c === "_") {
        canOpen = left && (!right || punct(before));
        canClose = right && (!left || punct(after));
      }
      if (c === "~" && run !== 2) {
        canOpen = canClose = false;
      }
      flush();
      items.push({ kind: "delim", ch: c, count: run, original: run, canOpen, canClose });
      i += run;
    } else {
      buf += c;
      i++;
    }
  }
  flush();
  return items;
}

function count(s, ch) {
  return s.split(ch).length - 1;
}

function runLength(text, i, ch) {
  let n = 0;
  while (text[i + n] === ch) n++;
  return n;
}

function closingTicks(text, from, run) {
  for (let j = text.indexOf("`", from); j >= 0; j = text.indexOf("`", j)) {
    const n = runLength(text, j, "`");
    if (n === run) return j;
    j += n;
  }
  return -1;
}

/** `[label](url "title")` starting at text[i] === "[", or null. */
function parseLink(text, i) {
  let depth = 0;
  let j = i;
  for (; j < text.length; j++) {
    const c = text[j];
    if (c === "\\") {
      j++;
    } else if (c === "`") {
      const run = runLength(text, j, "`");
      const close = closingTicks(text, j + run, run);
      j = close < 0 ? j + run - 1 : close + run - 1;
    } else if (c === "[") {
      depth++;
    } else if (c === "]") {
      depth--;
      if (depth === 0) break;
    }
  }
  if (depth !== 0 || text[j + 1] !== "(") return null;
  const label = text.slice(i + 1, j);
  let k = j + 2;
  while (text[k] === " ") k++;
  let url = "";
  if (text[k] === "<") {
    const close = text.indexOf(">", k);
    if (close < 0) return null;
    url = text.slice(k + 1, close);
    k = close + 1;
  } else {
    let parens = 0;
    for (; k < text.length; k++) {
      const c = text[k];
      if (SPACE.test(c)) break;
      if (c === "\\" && k + 1 < text.length) {
        url += text[++k];
        continue;
      }
      if (c === "(") parens++;
      if (c === ")") {
        if (parens === 0) break;
        parens--;
      }
      url += c;
    }
  }
  while (text[k] === " ") k++;
  let title = "";
  const quote = text[k];
  if (quote === '"' || quote === "'") {
    const close = text.indexOf(quote, k + 1);
    if (close < 0) return null;
    title = text.slice(k + 1, close);
    k = close + 1;
    while (text[k] === " ") k++;
  }
  if (text[k] !== ")") return null;
  return { label, url, title, end: k + 1 };
}

function linkNode(link, image) {
  const href = safeHref(link.url);
  const label = image ? `Image: ${link.label || link.url}` : link.label;
  // A link's text never holds another link (nested anchors are invalid HTML).
  const content = link.plain ? [document.createTextNode(label)] : inline(label, true);
  if (!href) {
    // Not a web address we allow (javascript:, data:, relative...): its text only.
    const span = el("span", "md-link-dropped");
    span.append(...content);
    return span;
  }
  const a = el("a", image ? "md-image-link" : "");
  a.href = href;
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  if (link.title) a.title = link.title;
  a.append(...content);
  if (!a.textContent) a.textContent = href;
  return a;
}

/** CommonMark's delimiter algorithm: match closers with the nearest fitting opener. */
function resolveEmphasis(items) {
  for (let c = 0; c < items.length; c++) {
    const closer = items[c];
    if (closer.kind !== "delim" || !closer.canClose || closer.count === 0) continue;
    let o = c - 1;
    for (; o >= 0; o--) {
      const opener = items[o];
      if (opener.kind !== "delim" || opener.ch !== closer.ch || !opener.canOpen
          || opener.count === 0) continue;
      if (closer.ch === "~" && (opener.count !== 2 || closer.count !== 2)) continue;
      const bothWays = opener.canClose || closer.canOpen;
      if (bothWays && (opener.original + closer.original) % 3 === 0
          && !(opener.original % 3 === 0 && closer.original % 3 === 0)) continue;
      break;
    }
    if (o < 0) continue;
    const opener = items[o];
    const use = closer.ch === "~" ? 2 : opener.count >= 2 && closer.count >= 2 ? 2 : 1;
    const tag = closer.ch === "~" ? "del" : use === 2 ? "strong" : "em";
    const wrapper = el(tag);
    wrapper.append(...toNodes(items.slice(o + 1, c)));
    opener.count -= use;
    closer.count -= use;
    items.splice(o + 1, c - o - 1, { kind: "node", node: wrapper });
    c = o + 1;
    if (opener.count === 0) {
      items.splice(o, 1);
      c--;
    }
    // Re-examine this closer if it has delimiters left: c points at the wrapper, so the
    // loop's increment lands on the closer again.
    if (closer.count === 0) {
      items.splice(c + 1, 1);
    }
  }
}

function toNodes(items) {
  const nodes = [];
  let buf = "";
  for (const item of items) {
    if (item.kind === "text") buf += item.text;
    else if (item.kind === "delim") buf += item.ch.repeat(item.count);
    else {
      if (buf) nodes.push(document.createTextNode(buf));
      buf = "";
      nodes.push(item.node);
    }
  }
  if (buf) nodes.push(document.createTextNode(buf));
  return nodes;
}

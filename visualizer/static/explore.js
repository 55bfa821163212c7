// The explorer page (issue 13): predictions, the layer graph, a layer's maps, filters and
// statistics, filter marks, and techniques computed on demand, all read from the JSON
// endpoints named in #explorer's data-urls (see /work/notes/explore-contract.md).
"use strict";

(function () {
  var root = document.getElementById("explorer");
  if (!root) { return; }
  var urls = JSON.parse(root.dataset.urls);
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrfToken = csrfMeta ? csrfMeta.content : "";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var STATE_POLL_MS = 1000;
  var STATE_POLL_READY_MS = 5000;
  var COMPUTE_POLL_MS = 250;
  var PENDING_RETRY_MS = 500;
  var CLICK_DELAY_MS = 250;  // a double click starts with a click: wait before marking "good"
  var TOOLTIP_CONFIG_LINES = 30;
  var TOOLTIP_VALUE_CHARS = 60;
  var NODE_W = 210, NODE_H = 64, DUMMY_W = 14, GAP_X = 26, RANK_H = 100, MARGIN = 30;
  var ORDERING_SWEEPS = 6;
  var ZOOM_STEP = 1.25, ZOOM_MIN = 0.02, ZOOM_MAX = 2;
  var LABEL_ROOM = 120;  // right of the rightmost node: an edge label
  var MODEL_TITLE_ROOM = 200;  // or an open nested model's title
  var TECHNIQUE_NAMES = {deconvolution: "Deconvolution", deep_visualization: "Deep visualization",
                         grad_cam: "Grad-CAM", all: "Every technique"};

  var view = {
    state: null, loaded: false, images: [], image: null, predictions: null,
    architecture: null, nodes: {}, children: {}, expanded: {}, marks: {},
    node: null, filterCounts: {}, nodeBars: {}, layerRequest: 0, zoom: 1,
  };

  // ---- small helpers ----------------------------------------------------------------

  function byId(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttributes(node, attrs);
    (children || []).forEach(function (child) {
      if (child !== null && child !== undefined) {
        node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
      }
    });
    return node;
  }

  function svgEl(tag, attrs, children) {
    var node = document.createElementNS(SVG_NS, tag);
    setAttributes(node, attrs);
    (children || []).forEach(function (child) { node.appendChild(child); });
    return node;
  }

  function setAttributes(node, attrs) {
    Object.keys(attrs || {}).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) { return; }
      if (key === "text") { node.textContent = value; } else { node.setAttribute(key, value); }
    });
  }

  function svgText(x, y, text, cls) {
    return svgEl("text", {x: x, y: y, "class": cls, text: text});
  }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function thousands(n) { return Number(n).toLocaleString("en-US"); }

  function shorten(text, length) {
    text = String(text);
    return text.length > length ? text.slice(0, length - 1) + "…" : text;
  }

  function answer(response) {
    return response.json().catch(function () { return {}; }).then(function (data) {
      if (!response.ok) {
        throw new Error(data.message || data.error || "the server answered HTTP " + response.status);
      }
      return data;
    });
  }

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", cache: "no-store"}).then(answer);
  }

  // Results the job has not written yet answer 202 {"pending": true}: ask again.
  function getReady(url, onPending) {
    return getJSON(url).then(function (data) {
      if (!data || !data.pending) { return data; }
      if (onPending) { onPending(data.message); }
      return new Promise(function (resolve) { setTimeout(resolve, PENDING_RETRY_MS); })
        .then(function () { return getReady(url, onPending); });
    });
  }

  function postJSON(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRFToken": csrfToken},
      body: JSON.stringify(body),
    }).then(answer);
  }

  function decodeBase64(text) {
    var binary = atob(text || "");
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) { bytes[i] = binary.charCodeAt(i); }
    return bytes;
  }

  function spinner() { return el("span", {"class": "spinner", "aria-hidden": "true"}); }

  // Viridis, from 10 anchors: maps read better in a perceptual colour map than in grey.
  var COLOUR_MAP = (function () {
    var anchors = [[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142],
                   [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
    var table = new Uint8Array(256 * 3);
    for (var v = 0; v < 256; v++) {
      var at = v / 255 * (anchors.length - 1), low = Math.floor(at);
      var high = Math.min(low + 1, anchors.length - 1), t = at - low;
      for (var k = 0; k < 3; k++) {
        table[v * 3 + k] = Math.round(anchors[low][k] * (1 - t) + anchors[high][k] * t);
      }
    }
    return table;
  })();

  // A canvas of width x height from uint8 values at data[offset...], in the colour map.
  function mapCanvas(data, offset, width, height) {
    var canvas = el("canvas", {width: width, height: height});
    paintMap(canvas, data, offset, width, height);
    return canvas;
  }

  function paintMap(canvas, data, offset, width, height) {
    canvas.width = width;
    canvas.height = height;
    var context = canvas.getContext("2d");
    var image = context.createImageData(width, height);
    var pixels = image.data;
    for (var i = 0; i < width * height; i++) {
      var v = data[offset + i];
      pixels[i * 4] = COLOUR_MAP[v * 3];
      pixels[i * 4 + 1] = COLOUR_MAP[v * 3 + 1];
      pixels[i * 4 + 2] = COLOUR_MAP[v * 3 + 2];
      pixels[i * 4 + 3] = 255;
    }
    context.putImageData(image, 0, 0);
  }

  // ---- state: starting / ready / failed / ended ----------------------------------------

  function pollState() {
    getJSON(urls.state).then(showState).catch(function (error) {
      showStatus("warning", "Could not read the exploration's state (" + error.message +
                 "); trying again.");
    }).then(function () {
      if (view.state !== "failed") {
        setTimeout(pollState, view.loaded ? STATE_POLL_READY_MS : STATE_POLL_MS);
      }
    });
  }

  function showState(data) {
    view.state = data.state;
    showNotices(data.notices || []);
    if (data.images && data.images.length !== view.images.length) {
      view.images = data.images;
      if (!view.image && view.images.length) { view.image = view.images[0].name; }
      drawImagePicker();
    }
    if (data.state === "starting") {
      showStatus("starting", data.message || "Loading the model and analysing the images…");
    } else if (data.state === "failed") {
      showFailure(data.message);
    } else {
      showStatus(data.state === "ended" ? "ended" : "ready",
                 data.state === "ended" ? "The analysis job is resting; it starts again on your " +
                 "next request." : null);
      if (!view.loaded) { view.loaded = true; loadExploration(); }
    }
  }

  function showStatus(kind, message) {
    var status = byId("explore-status");
    status.className = "explore-status explore-status-" + kind;
    clear(status);
    status.hidden = !message;
    if (!message) { return; }
    if (kind === "starting") { status.appendChild(spinner()); }
    status.appendChild(document.createTextNode(message));
  }

  function showFailure(message) {
    var status = byId("explore-status");
    status.className = "explore-status explore-status-failed";
    status.setAttribute("role", "alert");
    status.hidden = false;
    clear(status);
    status.appendChild(el("strong", {text: "This exploration failed."}));
    status.appendChild(el("p", {"class": "failure-message", text: message || "No reason was given."}));
    status.appendChild(el("p", {}, [
      "What to do: correct what the message names (for example save the model with ",
      el("code", {text: "model.save(\"model.keras\")"}),
      ", or provide class names one per class), then ",
      el("a", {href: root.dataset.indexUrl, text: "start a new exploration"}), "."]));
    byId("explore-content").hidden = true;
  }

  function showNotices(notices) {
    var list = byId("explore-notices");
    clear(list);
    list.hidden = !notices.length;
    notices.forEach(function (notice) { list.appendChild(el("li", {text: notice})); });
  }

  function loadExploration() {
    var waiting = function (message) { showStatus("starting", message || "Analysing…"); };
    Promise.all([getReady(urls.predictions, waiting), getReady(urls.architecture, waiting),
                 getJSON(urls.marks)])
      .then(function (answers) {
        view.predictions = answers[0];
        setArchitecture(answers[1]);
        view.marks = answers[2] || {};
        showStatus("ready", null);
        byId("explore-content").hidden = false;
        drawPredictions();
        drawArchitecture();
        var graph = byId("architecture");
        graph.scrollLeft = (graph.scrollWidth - graph.clientWidth) / 2;  // a wide graph: its middle
      }).catch(function (error) {
        view.loaded = false;
        showStatus("warning", "Could not load the exploration (" + error.message + "); trying again.");
      });
  }

  // ---- images and predictions ----------------------------------------------------------

  function imageUrl(name) {
    var found = view.images.filter(function (image) { return image.name === name; })[0];
    return found ? found.url : "";
  }

  function drawImagePicker() {
    var picker = byId("images");
    clear(picker);
    view.images.forEach(function (image) {
      var button = el("button", {type: "button", "class": "image-choice", title: image.name,
                                 "aria-pressed": String(image.name === view.image)},
                      [image.url ? el("img", {src: image.url, alt: ""}) : null,
                       el("span", {text: image.name})]);
      button.addEventListener("click", function () { selectImage(image.name); });
      picker.appendChild(button);
    });
  }

  function selectImage(name) {
    if (name === view.image) { return; }
    view.image = name;
    drawImagePicker();
    drawPredictions();
    clear(byId("all-results"));
    if (view.node) { loadLayer(view.node); }
  }

  function drawPredictions() {
    var box = byId("predictions");
    clear(box);
    if (!view.predictions || !view.image) { return; }
    var entry = (view.predictions.images || []).filter(function (image) {
      return image.name === view.image;
    })[0];
    var figure = el("figure", {"class": "prediction-image"},
                    [imageUrl(view.image) ? el("img", {src: imageUrl(view.image),
                                                       alt: "The image " + view.image}) : null,
                     el("figcaption", {text: view.image})]);
    var list = el("ol", {"class": "bars", "aria-label": "Top predictions for " + view.image});
    var top = entry ? entry.top.slice().sort(function (a, b) { return b.probability - a.probability; }) : [];
    top.forEach(function (guess) {
      var percent = guess.probability * 100;
      var fill = el("span", {"class": "bar-fill"});
      fill.style.width = Math.max(0, Math.min(100, percent)) + "%";
      list.appendChild(el("li", {"class": "bar-row"}, [
        el("span", {"class": "bar-label", title: "class " + guess.class_index,
                    text: guess.class_name || "class " + guess.class_index}),
        el("span", {"class": "bar-track"}, [fill]),
        el("span", {"class": "bar-value", text: percent.toFixed(1) + " %"})]));
    });
    if (!top.length) { list.appendChild(el("li", {"class": "muted", text: "No predictions for this image."})); }
    box.appendChild(figure);
    box.appendChild(list);
  }

  // ---- architecture: graph, layered layout, drawing --------------------------------------

  function setArchitecture(architecture) {
    view.architecture = architecture;
    view.nodes = {};
    view.children = {};
    architecture.nodes.forEach(function (node) {
      view.nodes[node.id] = node;
      if (node.parent) { (view.children[node.parent] = view.children[node.parent] || []).push(node.id); }
      if (node.is_model && view.expanded[node.id] === undefined) { view.expanded[node.id] = true; }
    });
    byId("architecture-totals").textContent =
      thousands(architecture.total_params) + " parameters · " +
      thousands(architecture.trainable_params) + " trainable · " +
      thousands(architecture.non_trainable_params) + " non-trainable · " +
      architecture.nodes.filter(function (node) { return !node.is_model; }).length + " layers";
  }

  // The outermost collapsed model containing `id`, or null.
  function collapsedAncestor(id) {
    var found = null;
    for (var parent = view.nodes[id].parent; parent; parent = view.nodes[parent].parent) {
      if (!view.expanded[parent]) { found = parent; }
    }
    return found;
  }

  function isOpenModel(id) {
    var node = view.nodes[id];
    return node.is_model && view.expanded[id] && (view.children[id] || []).length > 0;
  }

  // The drawn nodes an edge ending ("in") or starting ("out") at `id` attaches to: the node
  // itself, the collapsed model hiding it, or an open model's first (last) inner layers.
  function drawnEnds(id, side, edgesInside) {
    var hidden = collapsedAncestor(id);
    if (hidden) { return [hidden]; }
    if (!isOpenModel(id)) { return [id]; }
    var inner = view.children[id];
    var linked = {};
    edgesInside.forEach(function (edge) {
      if (view.nodes[edge.source].parent === id && view.nodes[edge.target].parent === id) {
        linked[side === "in" ? edge.target : edge.source] = true;
      }
    });
    var ends = inner.filter(function (child) { return !linked[child]; });
    return [].concat.apply([], (ends.length ? ends : inner.slice(0, 1)).map(function (child) {
      return drawnEnds(child, side, edgesInside);
    }));
  }

  function visibleGraph() {
    var architecture = view.architecture;
    var nodes = architecture.nodes.filter(function (node) {
      return !collapsedAncestor(node.id) && !isOpenModel(node.id);
    }).map(function (node) { return node.id; });
    var edges = [], seen = {};
    architecture.edges.forEach(function (edge) {
      if (!view.nodes[edge.source] || !view.nodes[edge.target]) { return; }
      drawnEnds(edge.source, "out", architecture.edges).forEach(function (source) {
        drawnEnds(edge.target, "in", architecture.edges).forEach(function (target) {
          var key = source + "\u0000" + target;
          if (source === target || seen[key]) { return; }
          seen[key] = true;
          edges.push({source: source, target: target, shape: edge.shape});
        });
      });
    });
    return {nodes: nodes, edges: edges};
  }

  // A layered layout: longest-path ranks, a dummy point per rank crossed by a long edge,
  // barycentre ordering sweeps, then x from the parents' mean, kept apart and centred.
  function layout(graph) {
    var items = {}, order = [];
    graph.nodes.forEach(function (id) {
      items[id] = {id: id, width: NODE_W, dummy: false, preds: [], succs: [], rank: 0};
      order.push(id);
    });
    var outgoing = {}, indegree = {};
    order.forEach(function (id) { outgoing[id] = []; indegree[id] = 0; });
    graph.edges.forEach(function (edge) { outgoing[edge.source].push(edge.target); indegree[edge.target] += 1; });
    var queue = order.filter(function (id) { return indegree[id] === 0; }), placed = 0;
    while (placed < queue.length) {
      var id = queue[placed++];
      outgoing[id].forEach(function (target) {
        items[target].rank = Math.max(items[target].rank, items[id].rank + 1);
        if (--indegree[target] === 0) { queue.push(target); }
      });
    }
    var routes = graph.edges.map(function (edge, index) {
      var chain = [edge.source];
      for (var rank = items[edge.source].rank + 1; rank < items[edge.target].rank; rank++) {
        var dummyId = "\u0000edge" + index + "/" + rank;
        items[dummyId] = {id: dummyId, width: DUMMY_W, dummy: true, preds: [], succs: [], rank: rank};
        chain.push(dummyId);
      }
      chain.push(edge.target);
      for (var i = 1; i < chain.length; i++) {
        items[chain[i - 1]].succs.push(chain[i]);
        items[chain[i]].preds.push(chain[i - 1]);
      }
      return {edge: edge, chain: chain};
    });
    var layers = [];
    Object.keys(items).forEach(function (key) {
      var item = items[key];
      (layers[item.rank] = layers[item.rank] || []).push(item);
    });
    layers = layers.filter(Boolean);
    layers.forEach(function (layer) { layer.forEach(function (item, i) { item.position = i; }); });

    function sweep(layer, neighbours) {
      layer.forEach(function (item) {
        var others = item[neighbours];
        item.centre = others.length ? others.reduce(function (sum, other) {
          return sum + items[other].position;
        }, 0) / others.length : item.position;
      });
      layer.sort(function (a, b) { return a.centre - b.centre || a.position - b.position; });
      layer.forEach(function (item, i) { item.position = i; });
    }
    for (var s = 0; s < ORDERING_SWEEPS; s++) {
      if (s % 2 === 0) {
        for (var down = 1; down < layers.length; down++) { sweep(layers[down], "preds"); }
      } else {
        for (var up = layers.length - 2; up >= 0; up--) { sweep(layers[up], "succs"); }
      }
    }

    var minX = Infinity, maxX = -Infinity;
    layers.forEach(function (layer, rank) {
      var x = 0, shift = 0, anchored = 0;
      layer.forEach(function (item, i) {
        var wanted = item.preds.length ? item.preds.reduce(function (sum, pred) {
          return sum + items[pred].x;
        }, 0) / item.preds.length : null;
        var least = i ? layer[i - 1].x + (layer[i - 1].width + item.width) / 2 + GAP_X : -Infinity;
        x = Math.max(wanted === null ? (i ? least : 0) : wanted, least);
        item.x = x;
        if (wanted !== null) { shift += x - wanted; anchored += 1; }
      });
      shift = anchored ? shift / anchored : 0;
      layer.forEach(function (item) {
        item.x -= shift;
        item.y = MARGIN + NODE_H / 2 + rank * RANK_H;
        minX = Math.min(minX, item.x - item.width / 2);
        maxX = Math.max(maxX, item.x + item.width / 2);
      });
    });
    Object.keys(items).forEach(function (key) { items[key].x += MARGIN - minX; });
    var room = graph.nodes.some(function (id) { return view.nodes[id].parent; }) ? MODEL_TITLE_ROOM : LABEL_ROOM;
    return {items: items, routes: routes, width: maxX - minX + 2 * MARGIN + room,
            height: MARGIN * 2 + layers.length * RANK_H};
  }

  // A smooth path through the route's points: vertical tangents at every point.
  function routePath(points) {
    var d = "M" + points[0].x + "," + points[0].y;
    for (var i = 1; i < points.length; i++) {
      var a = points[i - 1], b = points[i], half = (b.y - a.y) / 2;
      d += " C" + a.x + "," + (a.y + half) + " " + b.x + "," + (b.y - half) + " " + b.x + "," + b.y;
    }
    return d;
  }

  function drawArchitecture() {
    var started = performance.now();
    var box = byId("architecture");
    var graph = visibleGraph();
    var placed = layout(graph);
    var svg = svgEl("svg", {width: placed.width * view.zoom, height: placed.height * view.zoom,
                            "class": "graph", viewBox: "0 0 " + placed.width + " " + placed.height,
                            "data-width": placed.width, "data-height": placed.height});
    svg.appendChild(svgEl("defs", {}, [svgEl("marker", {
      id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: "auto-start-reverse"}, [svgEl("path", {d: "M0,0 L10,5 L0,10 z", "class": "arrow"})])]));
    var boxes = svgEl("g", {"class": "model-boxes"});
    var edges = svgEl("g", {"class": "edges"});
    var nodes = svgEl("g", {"class": "nodes"});
    svg.appendChild(boxes);
    svg.appendChild(edges);
    svg.appendChild(nodes);

    placed.routes.forEach(function (route) {
      var points = route.chain.map(function (id) { return {x: placed.items[id].x, y: placed.items[id].y}; });
      points[0].y += NODE_H / 2;
      points[points.length - 1].y -= NODE_H / 2 + 2;
      var group = svgEl("g", {"class": "edge", "data-source": route.edge.source,
                              "data-target": route.edge.target});
      group.appendChild(svgEl("path", {d: routePath(points), "marker-end": "url(#arrow)"}));
      if (route.edge.shape) {
        // A long edge is labelled at its first bend, away from its source's other edges.
        var at = points.length > 2 ? points[1] : {x: (points[0].x + points[1].x) / 2,
                                                  y: (points[0].y + points[1].y) / 2};
        group.appendChild(svgText(at.x + 6, at.y + 4, route.edge.shape, "edge-label"));
      }
      edges.appendChild(group);
    });

    view.nodeBars = {};
    graph.nodes.forEach(function (id) { nodes.appendChild(drawNode(view.nodes[id], placed.items[id])); });
    drawModelBoxes(boxes, placed);
    clear(box);
    box.appendChild(svg);
    box.dataset.drawMs = (performance.now() - started).toFixed(1);
  }

  function drawNode(node, item) {
    var x = item.x - NODE_W / 2, y = item.y - NODE_H / 2;
    var group = svgEl("g", {"class": "node kind-" + (node.kind || "other") +
                                     (node.id === view.node ? " selected" : ""),
                            transform: "translate(" + x + "," + y + ")", tabindex: 0,
                            role: "button", "data-node": node.id,
                            "aria-label": (node.is_model ? "Nested model " : "Layer ") + node.name +
                                          " (" + node.type + ")"});
    group.appendChild(svgEl("rect", {width: NODE_W, height: NODE_H, rx: 7, "class": "frame"}));
    var title = node.is_model ? "▸ " + node.name : node.name;
    group.appendChild(svgText(10, 18, shorten(title, 28), "node-name"));
    var count = node.is_model ? (view.children[node.id] || []).length + " layers" :
      thousands(node.params) + " params";
    group.appendChild(svgText(10, 35, shorten(node.type + " · " + count, 34), "node-type"));
    group.appendChild(svgText(10, 51, shorten(node.output_shape || "", 34), "node-shape"));
    if (node.has_filters) {
      var bar = svgEl("g", {"class": "marks-bar", transform: "translate(6," + (NODE_H - 8) + ")"});
      group.appendChild(bar);
      view.nodeBars[node.id] = bar;
      drawMarksBar(node.id);
    }
    group.addEventListener("click", function () { activateNode(node); });
    group.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); activateNode(node); }
    });
    group.addEventListener("mouseenter", function (event) { showTooltip(node, event); });
    group.addEventListener("mousemove", moveTooltip);
    group.addEventListener("mouseleave", hideTooltip);
    group.addEventListener("focus", function () { showTooltip(node, null, group); });
    group.addEventListener("blur", hideTooltip);
    return group;
  }

  // A frame around each open nested model's layers, whose header closes it.
  function drawModelBoxes(boxes, placed) {
    view.architecture.nodes.forEach(function (node) {
      if (!isOpenModel(node.id) || collapsedAncestor(node.id)) { return; }
      var left = Infinity, top = Infinity, right = -Infinity, bottom = -Infinity;
      (function visit(id) {
        (view.children[id] || []).forEach(function (child) {
          var item = placed.items[child];
          if (item) {
            left = Math.min(left, item.x - NODE_W / 2); right = Math.max(right, item.x + NODE_W / 2);
            top = Math.min(top, item.y - NODE_H / 2); bottom = Math.max(bottom, item.y + NODE_H / 2);
          }
          visit(child);
        });
      })(node.id);
      if (left === Infinity) { return; }
      var group = svgEl("g", {"class": "model-box", "data-node": node.id, role: "button", tabindex: 0,
                              "aria-label": "Close nested model " + node.name});
      group.appendChild(svgEl("rect", {x: left - 10, y: top - 8, width: right - left + 20,
                                       height: bottom - top + 16, rx: 10}));
      group.appendChild(svgText(right + 18, top + 12, "▾ " + node.name, "model-box-title"));
      group.appendChild(svgText(right + 18, top + 28, node.type + " · " + thousands(node.params) +
                                " params", "model-box-facts"));
      group.appendChild(svgText(right + 18, top + 44, "click to close", "model-box-facts"));
      group.addEventListener("click", function (event) {
        if (event.target.closest(".node")) { return; }
        toggleModel(node.id);
      });
      group.addEventListener("keydown", function (event) {
        if (event.key === "Enter") { toggleModel(node.id); }
      });
      boxes.appendChild(group);
    });
  }

  function activateNode(node) {
    if (node.is_model) { toggleModel(node.id); } else { selectNode(node.id); }
  }

  function toggleModel(id) {
    view.expanded[id] = !view.expanded[id];
    hideTooltip();
    drawArchitecture();
  }

  // ---- node tooltip (the layer's configuration) ----------------------------------------

  function showTooltip(node, event, anchor) {
    var tip = byId("node-tooltip");
    clear(tip);
    tip.appendChild(el("strong", {text: node.name}));
    tip.appendChild(el("div", {"class": "muted", text: node.type + " · output " + node.output_shape +
                                                   " · " + thousands(node.params) + " params"}));
    var lines = configLines(node.config || {});
    if (lines.length > TOOLTIP_CONFIG_LINES) {
      lines = lines.slice(0, TOOLTIP_CONFIG_LINES).concat(["…"]);
    }
    tip.appendChild(el("pre", {text: lines.join("\n")}));
    tip.hidden = false;
    if (event) { moveTooltip(event); } else {
      var box = anchor.getBoundingClientRect();
      placeTooltip(box.right + 8, box.top);
    }
  }

  // One line per set option: nested Keras objects by their class name, nulls left out.
  function configLines(config) {
    return Object.keys(config).sort().filter(function (key) {
      return config[key] !== null && config[key] !== undefined;
    }).map(function (key) {
      var value = config[key];
      if (value && typeof value === "object" && !Array.isArray(value) && value.class_name) {
        var inner = value.config && typeof value.config.name === "string" ? " " + value.config.name : "";
        value = value.class_name + inner;
      } else {
        value = JSON.stringify(value);
      }
      return key + ": " + shorten(value, TOOLTIP_VALUE_CHARS);
    });
  }

  function moveTooltip(event) { placeTooltip(event.clientX + 16, event.clientY + 12); }

  function placeTooltip(x, y) {
    var tip = byId("node-tooltip");
    var width = tip.offsetWidth, height = tip.offsetHeight;
    tip.style.left = Math.max(4, Math.min(x, window.innerWidth - width - 8)) + "px";
    tip.style.top = Math.max(4, Math.min(y, window.innerHeight - height - 8)) + "px";
  }

  function hideTooltip() { byId("node-tooltip").hidden = true; }

  // The graph drawn at `zoom` times its size, the point at the middle of the box kept there.
  function zoomTo(zoom) {
    var box = byId("architecture"), svg = box.querySelector("svg");
    if (!svg) { return; }
    zoom = Math.max(ZOOM_MIN, Math.min(ZOOM_MAX, zoom));
    var ratio = zoom / view.zoom;
    var middleX = (box.scrollLeft + box.clientWidth / 2) * ratio;
    var middleY = (box.scrollTop + box.clientHeight / 2) * ratio;
    view.zoom = zoom;
    svg.setAttribute("width", svg.dataset.width * zoom);
    svg.setAttribute("height", svg.dataset.height * zoom);
    box.scrollLeft = middleX - box.clientWidth / 2;
    box.scrollTop = middleY - box.clientHeight / 2;
  }

  function wholeGraphZoom() {
    var box = byId("architecture"), svg = box.querySelector("svg");
    return Math.min(1, box.clientWidth / svg.dataset.width, box.clientHeight / svg.dataset.height);
  }

  byId("zoom-in").addEventListener("click", function () { zoomTo(view.zoom * ZOOM_STEP); });
  byId("zoom-out").addEventListener("click", function () { zoomTo(view.zoom / ZOOM_STEP); });
  byId("zoom-fit").addEventListener("click", function () { zoomTo(wholeGraphZoom()); });
  byId("zoom-reset").addEventListener("click", function () { zoomTo(1); });

  // Dragging the graph's background scrolls it.
  function enablePanning(box) {
    var drag = null;
    box.addEventListener("mousedown", function (event) {
      if (event.button !== 0 || event.target.closest(".node, .model-box")) { return; }
      drag = {x: event.clientX, y: event.clientY, left: box.scrollLeft, top: box.scrollTop};
      box.classList.add("panning");
      event.preventDefault();
    });
    window.addEventListener("mousemove", function (event) {
      if (!drag) { return; }
      box.scrollLeft = drag.left - (event.clientX - drag.x);
      box.scrollTop = drag.top - (event.clientY - drag.y);
    });
    window.addEventListener("mouseup", function () { drag = null; box.classList.remove("panning"); });
  }

  // ---- marks ------------------------------------------------------------------------------

  function filterCount(id) {
    if (view.filterCounts[id]) { return view.filterCounts[id]; }
    var numbers = String(view.nodes[id].output_shape || "").match(/\d+/g);
    return numbers ? Number(numbers[numbers.length - 1]) : 0;
  }

  function markOf(id, index) { return (view.marks[id] || {})[String(index)] || null; }

  function drawMarksBar(id) {
    var bar = view.nodeBars[id];
    if (!bar) { return; }
    var total = filterCount(id), good = 0, bad = 0, marks = view.marks[id] || {};
    Object.keys(marks).forEach(function (key) {
      if (marks[key] === "good") { good += 1; } else if (marks[key] === "bad") { bad += 1; }
    });
    total = Math.max(total, good + bad);
    var unmarked = total - good - bad, width = NODE_W - 12, x = 0;
    clear(bar);
    setAttributes(bar, {"data-good": good, "data-bad": bad, "data-unmarked": unmarked});
    bar.appendChild(svgEl("title", {text: good + " good, " + bad + " bad, " + unmarked + " unmarked"}));
    [["good", good], ["bad", bad], ["unmarked", unmarked]].forEach(function (part) {
      var w = total ? width * part[1] / total : (part[0] === "unmarked" ? width : 0);
      if (w > 0) { bar.appendChild(svgEl("rect", {x: x, y: 0, width: w, height: 5, "class": "mark-" + part[0]})); }
      x += w;
    });
  }

  function setMark(id, index, mark) {
    postJSON(urls.set_mark, {node: id, filter: index, mark: mark}).then(function (marks) {
      view.marks = marks || {};
      showMarks(id);
    }).catch(function (error) {
      layerMessage("Could not save the mark: " + error.message, true);
    });
  }

  function showMarks(id) {
    drawMarksBar(id);
    if (view.node !== id) { return; }
    document.querySelectorAll("#filters .filter, #stats tbody tr").forEach(function (item) {
      var mark = markOf(id, item.dataset.index);
      item.classList.toggle("mark-good", mark === "good");
      item.classList.toggle("mark-bad", mark === "bad");
      item.dataset.mark = mark || "unmarked";
    });
    document.querySelectorAll("#stats tbody button[data-mark]").forEach(function (button) {
      var row = button.closest("tr");
      button.setAttribute("aria-pressed", String(row.dataset.mark === button.dataset.mark));
    });
  }

  // Click = good, double click = bad, shift-click = unmarked.
  function markOnClicks(item, id, index) {
    var pending = null;
    item.addEventListener("click", function (event) {
      if (event.shiftKey) { setMark(id, index, null); return; }
      clearTimeout(pending);
      pending = setTimeout(function () { setMark(id, index, "good"); }, CLICK_DELAY_MS);
    });
    item.addEventListener("dblclick", function () {
      clearTimeout(pending);
      setMark(id, index, "bad");
    });
  }

  // ---- the layer panel ------------------------------------------------------------------

  function layerUrl(id) {
    var path = id.split("/").map(encodeURIComponent).join("/");
    return urls.layers + "/" + path + ".json?image=" + encodeURIComponent(view.image);
  }

  function selectNode(id) {
    view.node = id;
    document.querySelectorAll("#architecture .node").forEach(function (group) {
      group.classList.toggle("selected", group.dataset.node === id);
    });
    var node = view.nodes[id];
    byId("layer-placeholder").hidden = true;
    byId("layer-panel").hidden = false;
    byId("layer-title").textContent = node.name;
    byId("layer-facts").textContent = node.type + " · output " + node.output_shape + " · " +
                                      thousands(node.params) + " params";
    document.querySelectorAll(".on-demand button[data-technique]").forEach(function (button) {
      var needsMaps = button.dataset.technique !== "deep_visualization";
      button.disabled = needsMaps && !node.has_maps;
      button.title = button.disabled ? "Needs a layer with spatial maps" : "";
    });
    loadLayer(id);
  }

  function layerMessage(message, isError) {
    var status = byId("layer-status");
    clear(status);
    status.className = "layer-status" + (isError ? " layer-error" : "");
    if (message) {
      if (!isError) { status.appendChild(spinner()); }
      status.appendChild(document.createTextNode(message));
    }
  }

  function loadLayer(id) {
    var request = ++view.layerRequest;
    layerMessage("Loading the activations of " + view.nodes[id].name + "…");
    getReady(layerUrl(id), function (message) {
      if (request === view.layerRequest) { layerMessage(message || "Computing this layer…"); }
    }).then(function (layer) {
      if (request !== view.layerRequest) { return; }  // a later click won
      layerMessage(null);
      drawLayer(layer);
    }).catch(function (error) {
      if (request !== view.layerRequest) { return; }
      layerMessage("Could not load this layer: " + error.message, true);
    });
  }

  function drawLayer(layer) {
    var id = layer.node;
    var data = decodeBase64(layer.activations);
    var shape = layer.shape;
    if (layer.stats && layer.stats.length) { view.filterCounts[id] = layer.stats.length; }
    if (layer.message) { layerMessage(layer.message, true); }
    if (!shape.length) {  // nothing to draw; the message says why
      clear(byId("maps"));
      byId("maps-title").textContent = "Activations";
      drawFilters(id, null);
      drawStats(id, []);
      return;
    }
    byId("maps-title").textContent = (shape.length === 3 ? shape[0] + " maps of " + shape[1] + "×" +
      shape[2] : shape.length === 2 ? shape[0] + " channels of " + shape[1] + " steps" :
      shape[0] + " units") + " for " + layer.image + " (values " + layer.range[0].toPrecision(3) +
      " to " + layer.range[1].toPrecision(3) + ")";
    byId("enlarged-input").src = imageUrl(layer.image);
    resetEnlarged();
    var maps = byId("maps");
    clear(maps);
    maps.className = "maps";
    if (shape.length === 3) {
      drawMapGrid(maps, data, shape, layer);
    } else {
      drawStrip(maps, data, shape, layer);
    }
    drawFilters(id, layer.filters);
    drawStats(id, layer.stats || []);
    showMarks(id);
    drawMarksBar(id);
  }

  function statsText(layer, index) {
    var stats = (layer.stats || [])[index];
    return stats ? " · mean " + stats.mean.toPrecision(3) + " · " +
      Math.round(stats.zero_fraction * 100) + " % zeros" : "";
  }

  function drawMapGrid(maps, data, shape, layer) {
    var count = shape[0], height = shape[1], width = shape[2], size = height * width;
    var tile = count <= 16 ? 76 : count <= 64 ? 56 : count <= 256 ? 40 : 30;
    maps.style.setProperty("--tile", tile + "px");
    var fragment = document.createDocumentFragment();
    for (var c = 0; c < count; c++) {
      var canvas = mapCanvas(data, c * size, width, height);
      var item = el("button", {type: "button", "class": "map", "data-index": c,
                               "aria-label": "Map " + c}, [canvas]);
      fragment.appendChild(item);
    }
    maps.appendChild(fragment);
    maps.querySelectorAll(".map").forEach(function (item) {
      var index = Number(item.dataset.index);
      item.addEventListener("mouseenter", function () {
        enlarge(data, index * size, width, height, "Map " + index + " of " + count + statsText(layer, index));
        item.classList.add("hovered");
      });
      item.addEventListener("focus", function () {
        enlarge(data, index * size, width, height, "Map " + index + " of " + count + statsText(layer, index));
      });
      item.addEventListener("mouseleave", function () { item.classList.remove("hovered"); });
      item.addEventListener("click", function () { chooseUnit(index); });
    });
  }

  // Units (one row) or channels over time (a row per channel), drawn as one strip.
  function drawStrip(maps, data, shape, layer) {
    var rows = shape.length === 2 ? shape[0] : 1, columns = shape.length === 2 ? shape[1] : shape[0];
    var canvas = mapCanvas(data, 0, columns, rows);
    canvas.className = "strip";
    canvas.style.height = Math.max(28, Math.min(rows * 10, 400)) + "px";
    maps.classList.add("maps-strip");
    maps.appendChild(canvas);
    var pointed = function (event) {
      var box = canvas.getBoundingClientRect();
      var column = Math.min(columns - 1, Math.floor((event.clientX - box.left) / box.width * columns));
      var row = Math.min(rows - 1, Math.floor((event.clientY - box.top) / box.height * rows));
      return {column: Math.max(0, column), row: Math.max(0, row)};
    };
    canvas.addEventListener("mousemove", function (event) {
      var at = pointed(event);
      if (rows === 1) {
        var value = data[at.column] / 255 * (layer.range[1] - layer.range[0]) + layer.range[0];
        setEnlargedCaption("Unit " + at.column + " of " + columns + ": " + value.toPrecision(3) +
                           statsText(layer, at.column));
      } else {
        enlarge(data, at.row * columns, columns, 1, "Channel " + at.row + " of " + rows +
                statsText(layer, at.row));
      }
    });
    canvas.addEventListener("click", function (event) {
      var at = pointed(event);
      chooseUnit(rows === 1 ? at.column : at.row);
    });
  }

  function resetEnlarged() {
    var canvas = byId("enlarged-map");
    canvas.width = 1; canvas.height = 1;
    canvas.classList.remove("shown");
    setEnlargedCaption("Hover a map to enlarge it");
  }

  function enlarge(data, offset, width, height, caption) {
    var canvas = byId("enlarged-map");
    paintMap(canvas, data, offset, width, height);
    canvas.classList.add("shown");
    setEnlargedCaption(caption);
  }

  function setEnlargedCaption(text) { byId("enlarged-caption").textContent = text; }

  function chooseUnit(index) {
    byId("unit").value = index;
    document.querySelectorAll("#maps .map").forEach(function (item) {
      item.classList.toggle("chosen", Number(item.dataset.index) === index);
    });
  }

  function drawFilters(id, filters) {
    var block = byId("filters-block"), box = byId("filters");
    clear(box);
    block.hidden = !filters;
    if (!filters) { return; }
    var shape = filters.shape, count = shape[0], kh = shape[1], kw = shape[2], channels = shape[3];
    var data = decodeBase64(filters.data), size = kh * kw * channels;
    byId("filters-hint").firstChild.textContent = (filters.rgb ? "First-layer filters in colour. " :
      channels > 1 ? "Each filter shown as the mean over its " + channels + " input channels. " : "") +
      "Mark a filter: click = good, double click = bad, shift-click = unmarked (or use the buttons " +
      "in the table below).";
    var fragment = document.createDocumentFragment();
    for (var n = 0; n < count; n++) {
      var canvas = el("canvas", {width: kw, height: kh});
      var context = canvas.getContext("2d"), image = context.createImageData(kw, kh);
      for (var p = 0; p < kh * kw; p++) {
        var base = n * size + p * channels, rgb;
        if (filters.rgb) {
          rgb = [data[base], data[base + 1], data[base + 2]];
        } else {
          var sum = 0;
          for (var c = 0; c < channels; c++) { sum += data[base + c]; }
          rgb = [sum / channels, sum / channels, sum / channels];
        }
        image.data[p * 4] = rgb[0]; image.data[p * 4 + 1] = rgb[1]; image.data[p * 4 + 2] = rgb[2];
        image.data[p * 4 + 3] = 255;
      }
      context.putImageData(image, 0, 0);
      var item = el("button", {type: "button", "class": "filter", "data-index": n,
                               title: "Filter " + n, "aria-label": "Filter " + n}, [canvas]);
      markOnClicks(item, id, n);
      fragment.appendChild(item);
    }
    box.appendChild(fragment);
  }

  function drawStats(id, stats) {
    var block = byId("stats-block"), body = byId("stats").tBodies[0];
    clear(body);
    block.hidden = !stats.length;
    var highest = stats.reduce(function (top, row) { return Math.max(top, Math.abs(row.mean)); }, 0) || 1;
    var fragment = document.createDocumentFragment();
    stats.forEach(function (row) {
      var meanBar = el("span", {"class": "stat-fill"});
      meanBar.style.width = (Math.abs(row.mean) / highest * 100) + "%";
      var zeroBar = el("span", {"class": "stat-fill zero"});
      zeroBar.style.width = (row.zero_fraction * 100) + "%";
      var buttons = el("span", {"class": "mark-buttons"}, [["good", "Good"], ["bad", "Bad"],
        ["unmarked", "Clear"]].map(function (choice) {
        var button = el("button", {type: "button", "data-mark": choice[0], "aria-pressed": "false",
                                   "aria-label": choice[1] + " (filter " + row.index + ")",
                                   text: choice[1]});
        button.addEventListener("click", function () {
          setMark(id, row.index, choice[0] === "unmarked" ? null : choice[0]);
        });
        return button;
      }));
      fragment.appendChild(el("tr", {"data-index": row.index}, [
        el("td", {text: String(row.index)}),
        el("td", {}, [el("span", {"class": "stat-bar"}, [meanBar]), el("span", {text: row.mean.toPrecision(3)})]),
        el("td", {}, [el("span", {"class": "stat-bar"}, [zeroBar]),
                      el("span", {text: Math.round(row.zero_fraction * 100) + " %"})]),
        el("td", {}, [buttons])]));
    });
    body.appendChild(fragment);
  }

  // ---- techniques on demand ---------------------------------------------------------------

  function compute(technique, nodeId, unit, target, replace) {
    var node = nodeId ? view.nodes[nodeId] : null;
    var heading = TECHNIQUE_NAMES[technique] + (node ? " at " + node.name : "") +
      (unit !== null ? (technique === "grad_cam" ? "" : ", map/unit " + unit) : "") + " · " + view.image;
    var request = el("div", {"class": "compute-request", "data-technique": technique, "aria-live": "polite"},
                     [el("h4", {text: heading}),
                      el("p", {"class": "compute-state"}, [spinner(), "Computing…"]),
                      el("div", {"class": "technique-cards"})]);
    if (replace) { clear(target); }
    target.insertBefore(request, target.firstChild);
    postJSON(urls.compute, {technique: technique, node: nodeId, image: view.image, unit: unit})
      .then(function (started) { followCompute(started.poll, request); })
      .catch(function (error) { computeFailed(request, error.message); });
  }

  function followCompute(url, request) {
    getJSON(url).then(function (data) {
      drawResults(request, data.results || []);
      if (data.state === "pending") {
        setTimeout(function () { followCompute(url, request); }, COMPUTE_POLL_MS);
      } else if (data.state === "failed") {
        computeFailed(request, data.message || "no reason was given");
      } else {
        request.querySelector(".compute-state").remove();
        request.classList.add("done");
      }
    }).catch(function (error) { computeFailed(request, error.message); });
  }

  function computeFailed(request, message) {
    var state = request.querySelector(".compute-state");
    clear(state);
    state.className = "compute-state compute-failed";
    state.setAttribute("role", "alert");
    state.textContent = "Failed: " + message;
  }

  function drawResults(request, results) {
    var cards = request.querySelector(".technique-cards");
    results.forEach(function (result) {
      var key = result.key + "|" + result.image_url;
      if (cards.querySelector('[data-result="' + CSS.escape(key) + '"]')) { return; }
      cards.appendChild(el("figure", {"class": "technique-card", "data-result": key,
                                      "data-key": result.key}, [
        el("figcaption", {}, [el("strong", {text: result.title})]),
        el("img", {src: result.image_url, alt: result.title + ": " + (result.caption || "")}),
        result.caption ? el("p", {"class": "caption", text: result.caption}) : null,
        el("dl", {"class": "explain"}, [
          el("dt", {text: "What it shows"}), el("dd", {text: result.what || ""}),
          el("dt", {text: "How to read it"}), el("dd", {text: result.how || ""}),
          el("dt", {text: "How it can mislead"}), el("dd", {text: result.misleads || ""})])]));
    });
  }

  document.querySelectorAll(".on-demand button[data-technique]").forEach(function (button) {
    button.addEventListener("click", function () {
      var technique = button.dataset.technique;
      var unit = technique === "grad_cam" ? null : Math.max(0, parseInt(byId("unit").value, 10) || 0);
      compute(technique, view.node, unit, byId("on-demand-results"), false);
    });
  });
  byId("compute-all").addEventListener("click", function () {
    compute("all", null, null, byId("all-results"), true);
  });

  enablePanning(byId("architecture"));
  pollState();

})();

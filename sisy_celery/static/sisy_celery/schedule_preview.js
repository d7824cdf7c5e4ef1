/* Live preview of a task's next runs: asks the admin's preview view as the
   schedule or time zone is edited, and shows the runs or the error naming the field. */
"use strict";
(function() {
    function text(tag, className, content) {
        const node = document.createElement(tag);
        if (className) { node.className = className; }
        node.textContent = content;
        return node;
    }

    function render(box, data) {
        const nodes = [];
        if (data.error) {
            nodes.push(text("p", "errornote", data.error));
        } else {
            if (data.warnings && data.warnings.length) {
                const warnings = document.createElement("ul");
                warnings.className = "messagelist";
                for (const warning of data.warnings) { warnings.appendChild(text("li", "warning", warning)); }
                nodes.push(warnings);
            }
            nodes.push(text("p", "quiet", data.description));
            const list = document.createElement("ol");
            for (const run of data.runs) {
                const item = text("li", "", run.local + " ");
                item.appendChild(text("span", "quiet", "(" + run.relative + ")"));
                list.appendChild(item);
            }
            nodes.push(list);
        }
        box.replaceChildren(...nodes);
    }

    function start() {
        const box = document.querySelector(".sisy-preview");
        const schedule = document.getElementById("id_schedule");
        const zone = document.getElementById("id_timezone");
        if (!box || !schedule || box.dataset.once) { return; }  // a one-off task does not use its schedule
        let timer = null;
        let latest = 0;
        function refresh() {
            const query = new URLSearchParams({schedule: schedule.value, timezone: zone ? zone.value : "",
                                               anchor: box.dataset.anchor || ""});
            const request = ++latest;
            fetch(box.dataset.url + "?" + query, {credentials: "same-origin", headers: {Accept: "application/json"}})
                .then(response => response.json())
                .then(data => { if (request === latest) { render(box, data); } })
                .catch(error => { if (request === latest) { render(box, {error: String(error)}); } });
        }
        function later() {
            clearTimeout(timer);
            timer = setTimeout(refresh, 300);
        }
        schedule.addEventListener("input", later);
        if (zone) { zone.addEventListener("input", later); }
        refresh();
    }

    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", start);
    } else {
        start();
    }
})();

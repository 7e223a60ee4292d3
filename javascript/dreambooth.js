// Dreambooth tab: a task id and the WebUI's progress bar for Start/Resume, polling of the run's status (loss
// chart, samples, errors) while a run is active, and a confirmation before a save overwrites a project.
// Works in the WebUI (which provides randomId, requestProgress, gradioApp, onUiLoaded) and in the standalone
// page (which does not).

function dreamboothApp() {
    if (typeof gradioApp === 'function') return gradioApp();
    var app = document.querySelector('gradio-app');
    return app && app.shadowRoot ? app.shadowRoot : document;
}

var dreamboothPoll = {timer: null, since: 0};

function dreamboothState() {
    var status = dreamboothApp().querySelector('#dreambooth_status .dreambooth-status');
    return status ? status.dataset.state : null;
}

function dreamboothRefresh() {
    var button = dreamboothApp().querySelector('#dreambooth_refresh');
    if (button) button.click();
}

// Poll the status once a second while a run is active; a few seconds' grace after a start, because the
// status still shows the previous run until the new one has reported.
function dreamboothWatch() {
    dreamboothPoll.since = Date.now();
    if (dreamboothPoll.timer) return;
    dreamboothRefresh();
    dreamboothPoll.timer = setInterval(function() {
        var state = dreamboothState();
        var settled = state === null || ['idle', 'finished', 'cancelled', 'failed'].indexOf(state) >= 0;
        if (settled && Date.now() - dreamboothPoll.since > 4000) {
            clearInterval(dreamboothPoll.timer);
            dreamboothPoll.timer = null;
            return;
        }
        dreamboothRefresh();
    }, 1000);
}

// _js of Start and Resume: the first input is the task id the host's progress API tracks.
function dreambooth_start() {
    var args = Array.from(arguments);
    var id = typeof randomId === 'function' ? randomId() : 'task(' + Math.random().toString(36).slice(2, 12) + ')';
    args[0] = id;
    if (typeof requestProgress === 'function' && typeof opts !== 'undefined') {
        var container = dreamboothApp().querySelector('#dreambooth_progressbar');
        if (container) requestProgress(id, container, null, dreamboothRefresh);
    }
    dreamboothWatch();
    return args;
}

// _js of Save: inputs are (overwrite, existing project names as JSON, project name, ...form).
function dreambooth_confirm_save() {
    var args = Array.from(arguments);
    var existing = [];
    try {
        existing = JSON.parse(args[1] || '[]');
    } catch (e) {
        existing = [];
    }
    args[0] = existing.indexOf(args[2]) >= 0 &&
        confirm('Project "' + args[2] + '" exists already. Overwrite its saved settings?');
    return args;
}

// The model box shows what the host has loaded, which changes outside this tab (the checkpoint dropdown at the
// top of the page). While the tab is on screen and no run is being followed, ask every few seconds; the answer
// carries the box only when the host loaded another model.
setInterval(function() {
    if (dreamboothPoll.timer || document.visibilityState !== 'visible') return;
    var status = dreamboothApp().querySelector('#dreambooth_status');
    if (status && status.offsetParent !== null) dreamboothRefresh();
}, 5000);

// After a (re)load: a run that is already going (e.g. started through the API), and what the host has loaded by
// now (the form of the last run comes back through the tab's own load event).
if (typeof onUiLoaded === 'function') {
    onUiLoaded(dreamboothWatch);
} else {
    setTimeout(dreamboothWatch, 500);
}
